"""MXFP4 (OCP microscaling FP4), read and restored: gpt-oss ships its MoE experts this way.

A tensor ``K`` is stored as ``K_blocks`` (uint8 ``[..., rows, G, 16]``: G blocks of 32 e2m1 values along
the last axis, two per byte, low nibble first) and ``K_scales`` (uint8 ``[..., rows, G]``: one e8m0
exponent per block, bias 127). Its value is ``[..., rows, 32·G]``, each element ``e2m1(code) · 2^(s-127)``,
computed as transformers' ``convert_moe_packed_tensors`` computes it (the e2m1 value times an fp32 power
of two, then cast), which NeMo's gpt-oss adapter copies: the same bits both loaders produce.

An e2m1 value times a power of two is exact in fp32, and in bf16 for every exponent up to 252, so
dequantizing is one to one and re-quantizing with the recorded scales (``quantize``) gives back the
source codes. Nothing here assumes it: ``quantize`` picks the nearest code, and the checks compare its
bytes with the source's, so a value that is not exactly a code shows up as a changed byte. Recast writes
MXFP4 only to restore a checkpoint's own values; it never chooses MXFP4 scales.

DeepSeek-V4 stores its routed experts as the same numbers spelled flat (``ScaleKind.FP4``): a 2-D ``K.weight``
of int8 ``[rows, in/2]`` (the same bytes as ``[rows, in/32, 16]``) beside ``K.scale`` ``[rows, in/32]`` of
e8m0 exponents stored as ``F8_E8M0``. ``unflatten`` / ``flatten`` move between the two spellings, so one
decoder serves both.
"""

from __future__ import annotations

import functools

import torch

from .errors import CheckpointError

# e2m1 code -> value (codes 8-15 are the negatives of 0-7, -0.0 included), as transformers lists them.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Magnitudes between neighbouring codes 0-7: bucketize maps a magnitude to its nearest code.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
BLOCK = 32
PACKED = BLOCK // 2
BIAS = 127


def exponents(scales: torch.Tensor) -> torch.Tensor:
    """The e8m0 exponent bytes as int32, whether stored as ``U8`` or as ``F8_E8M0`` (DeepSeek-V4), whose
    torch dtype would otherwise convert by value."""
    if scales.dtype == torch.float8_e8m0fnu:
        scales = scales.view(torch.uint8)
    return scales.to(torch.int32)


def check(key: str, blocks: tuple[str, tuple[int, ...]], scales: tuple[str, tuple[int, ...]]) -> None:
    """Refuse a ``(dtype, shape)`` pair of blocks and scales that is not MXFP4, naming the key."""
    (bdtype, bshape), (sdtype, sshape) = blocks, scales
    if bdtype != "U8" or sdtype != "U8":
        raise CheckpointError(
            f"MXFP4 tensor {key!r} is {bdtype} with {sdtype} scales; MXFP4 blocks and scales are U8"
        )
    if len(bshape) < 2 or bshape[-1] != PACKED:
        raise CheckpointError(
            f"MXFP4 blocks {key!r} have shape {list(bshape)}; their last dimension must be {PACKED} "
            f"(a block of {BLOCK} FP4 values, two per byte)"
        )
    if tuple(sshape) != tuple(bshape[:-1]):
        raise CheckpointError(
            f"MXFP4 scales of {key!r} have shape {list(sshape)}, but its blocks {list(bshape)} need "
            f"one scale per block: {list(bshape[:-1])}"
        )


def check_flat(
    key: str, weight: tuple[str, tuple[int, ...]], scale: tuple[str, tuple[int, ...]], codes: str = "I8"
) -> None:
    """Refuse a flat FP4 weight (``codes``: I8 as DeepSeek-V4 stores them, U8 as MiMo-V2.6 does) and scale
    whose dtypes or shapes are not that layout, naming the key."""
    (wdtype, wshape), (sdtype, sshape) = weight, scale
    want = (*wshape[:-1], wshape[-1] // PACKED) if wshape else ()
    if wdtype != codes or sdtype not in ("F8_E8M0", "U8") or not wshape or wshape[-1] % PACKED:
        raise CheckpointError(
            f"FP4 weight {key!r} is {wdtype} {list(wshape)} with {sdtype} scales; flat FP4 weights here "
            f"are {codes} [rows, in/2] (in a multiple of {BLOCK}) with e8m0 exponents (F8_E8M0 or U8)"
        )
    if tuple(sshape) != want:
        raise CheckpointError(
            f"FP4 scales of {key!r} have shape {list(sshape)}, but its weight {list(wshape)} needs one "
            f"exponent per {BLOCK} values of a row: {list(want)}"
        )


def flat_value_shape(stored: tuple[int, ...]) -> tuple[int, ...]:
    """The value a flat ``[..., rows, in/2]`` FP4 tensor holds: ``[..., rows, in]``."""
    return (*stored[:-1], stored[-1] * 2)


def flat_stored_shape(value: tuple[int, ...]) -> tuple[int, ...]:
    return (*value[:-1], value[-1] // 2)


def unflatten(packed: torch.Tensor) -> torch.Tensor:
    """``[..., rows, in/2]`` int8 as the ``[..., rows, in/32, 16]`` uint8 blocks it is."""
    return packed.view(torch.uint8).reshape(*packed.shape[:-1], -1, PACKED)


def flatten(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.reshape(*blocks.shape[:-2], -1).view(torch.int8)


def value_shape(stored: tuple[int, ...]) -> tuple[int, ...]:
    """The dequantized tensor's shape: ``[..., rows, G, 16]`` holds ``[..., rows, 32·G]``."""
    return (*stored[:-2], stored[-2] * BLOCK)


def stored_shape(value: tuple[int, ...]) -> tuple[int, ...]:
    return (*value[:-1], value[-1] // BLOCK, PACKED)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[..., rows, G, 16]`` codes with ``[..., rows, G]`` exponents → ``[..., rows, 32·G]`` in ``dtype``.

    Each byte looks up its two values at once (an embedding row of a ``[256, 2]`` table: one gather instead
    of two nibble lookups), then the block's power of two multiplies them in fp32, in two halves: ``2^128``
    (exponent 255) is no fp32 value, ``2^64`` is, and each product rounds at most once, to what ``ldexp``
    gives (0 · 2^128 stays 0, not NaN)."""
    b = blocks.view(torch.uint8)
    values = torch.nn.functional.embedding(b.to(torch.int32), _pairs(b.device)).reshape(*b.shape[:-1], BLOCK)
    e = exponents(scales) - BIAS
    half = torch.div(e, 2, rounding_mode="floor")
    values.mul_(_powers(half).unsqueeze(-1)).mul_(_powers(e - half).unsqueeze(-1))
    return values.reshape(*b.shape[:-2], -1).to(dtype)


def quantize(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The codes of ``[..., rows, 32·G]`` values under recorded ``[..., rows, G]`` exponents, packed as
    ``[..., rows, G, 16]`` uint8: the nearest code of each value divided by its block's power of two.

    Every boundary between neighbouring codes is a multiple of 1/4, so ``ceil(4·|y|)`` names the interval
    a magnitude falls in and a 25-entry table its code: ``bucketize`` over the midpoints, computed once
    for those 25 points (a NaN takes the top code, as ``bucketize`` gives it)."""
    *lead, width = values.shape
    y = (
        values.float()
        .reshape(*lead, width // BLOCK, BLOCK)
        .mul_(_powers(BIAS - exponents(scales)).unsqueeze(-1))
    )
    table = _codes(y.device)
    top = len(table) - 1
    k = y.abs().mul_(4).ceil_().nan_to_num_(float(top)).clamp_(0, top).to(torch.int64)
    codes = table[k] | (torch.signbit(y).to(torch.uint8) << 3)
    pairs = codes.reshape(*lead, width // BLOCK, PACKED, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


@functools.cache
def _pairs(device: torch.device) -> torch.Tensor:
    """``[256, 2]``: the two e2m1 values of each byte, low nibble first."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack((lut[byte & 0x0F], lut[byte >> 4]), dim=-1).to(device)


@functools.cache
def _codes(device: torch.device) -> torch.Tensor:
    """The code of each interval ``ceil(4·|y|)`` = 0 … 24 (magnitudes up to 6, the largest)."""
    quarters = torch.arange(int(4 * FP4_VALUES[7]) + 1, dtype=torch.float32) / 4
    return torch.bucketize(quarters, torch.tensor(_MIDPOINTS)).to(torch.uint8).to(device)


def _powers(e: torch.Tensor) -> torch.Tensor:
    """``2^e`` in fp32, exactly (``ldexp`` of ones)."""
    return torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=e.device), e)


def expand(scales: torch.Tensor) -> torch.Tensor:
    """Each block's multiplier ``2^(s-127)`` in fp32, repeated over its 32 values."""
    return _powers(exponents(scales) - BIAS).repeat_interleave(BLOCK, -1)
