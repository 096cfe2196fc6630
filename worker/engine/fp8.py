"""FP8 (e4m3) scale handling, dequantization and quantization, all in fp32.

Every multiply and divide happens in fp32 and only the result is cast, so CPU and CUDA produce the
same bits and re-quantizing with the original scale restores the original FP8 bytes exactly.
Functions work on a slice of rows (dim 0) so callers can stream a large tensor in pieces.
MXFP4 (mxfp4.py) is one more ``ScaleKind`` here: the kind-dispatching functions (``decode``, ``encode``,
``dequantize_rows``, ``quantize_rows``, the shapes) send it there, so the directions need no branch of their own.
MXFP8 (MiniMax-M3, Inkling 2: transformers' ``fp8`` with ``weight_block_size [1, 32]`` and ``scale_fmt:
ue8m0``) is e4m3 codes with one e8m0 exponent (uint8, bias 127) per 32 columns of a row: its multiplier is
a power of two, so it is plain FP8 arithmetic with a scale that ``expand_scale`` spells out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import cache

import torch

from . import lut, mxfp4
from .errors import CheckpointError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128


class ScaleKind(StrEnum):
    PER_TENSOR = "per-tensor"
    PER_EXPERT = "per-expert"
    PER_CHANNEL = "per-channel"
    BLOCK = "block"
    MXFP4 = "mxfp4"  # not FP8: e2m1 codes in blocks of 32 with e8m0 exponents (mxfp4.py)
    MXFP8 = "mxfp8"  # e4m3 codes, one e8m0 exponent (uint8) per 32 columns of a row
    FP4 = "fp4"  # MXFP4's numbers spelled flat: int8 [rows, in/2] with e8m0 [rows, in/32] (DeepSeek-V4)
    # 128x128 blocks whose grid restarts at every one of n equal row shards (MiMo-V2.5-Pro's fused qkv,
    # saved TP shard by TP shard): [n * ceil(rows/n/128), ceil(cols/128)]
    SHARDED = "sharded-block"
    # e4m3 with one (e8m0, power-of-two) scale per 32x32 block: DeepSeek-V4.1's dense weights
    BLOCK32 = "block-32"
    # FP4 as DeepSeek-V4's, the codes stored uint8 (MiMo-V2.6's experts: K.weight with K.weight_scale)
    FP4_U8 = "fp4-u8"

    @property
    def stored_dtype(self) -> str:
        """The safetensors dtype of a tensor quantized with scales of this kind."""
        return {ScaleKind.MXFP4: "U8", ScaleKind.FP4: "I8", ScaleKind.FP4_U8: "U8"}.get(self, "F8_E4M3")

    @property
    def exact_only(self) -> bool:
        """Written only to restore a source's own codes (MXFP4, FP4, MXFP8: Recast never chooses e8m0
        exponents): a value that is not exactly one is an error, never a rounding within a bound."""
        return self in (ScaleKind.MXFP4, ScaleKind.MXFP8) or self.flat_fp4

    @property
    def restore_only(self) -> bool:
        """Its tensors are laid out as only this format holds them (gpt-oss's MXFP4 experts are
        ``[E, out, in]``, its bf16 release ``[E, in, out]``), so only a restore writes them; an MXFP8
        weight is an ordinary weight, free to go out in bf16 or with fresh FP8 scales."""
        return self is ScaleKind.MXFP4

    @property
    def flat_fp4(self) -> bool:
        """MXFP4's numbers spelled flat, ``[rows, in/2]`` codes with ``[rows, in/32]`` exponents."""
        return self in (ScaleKind.FP4, ScaleKind.FP4_U8)

    @property
    def tabulated(self) -> bool:
        """One scale per dim-0 slice (or one in all): the CPU tables apply, and the scale still fits a
        view whose last two dims are swapped. Per-channel and block scales vary within a slice."""
        return self in (ScaleKind.PER_TENSOR, ScaleKind.PER_EXPERT)


def classify_scale(key: str, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> ScaleKind:
    """Decide the scale granularity from shapes alone (DESIGN §4); anything else names the key."""
    squeezed = tuple(d for d in scale_shape if d != 1)
    if len(squeezed) == 0:
        return ScaleKind.PER_TENSOR
    if (
        len(weight_shape) == 3
        and len(squeezed) == 1
        and squeezed[0] == weight_shape[0]
        and (len(scale_shape) in (1, 3))
    ):
        return ScaleKind.PER_EXPERT
    # One scale per output row: [R, 1], or [E, R, 1] for 3-D experts (compressed-tensors' channel strategy).
    if len(weight_shape) in (2, 3) and tuple(scale_shape) == (*weight_shape[:-1], 1) and weight_shape[-2] > 1:
        return ScaleKind.PER_CHANNEL
    # Block scales are checked unsqueezed: a [1, N] scale of a weight with <= 128 rows is still 2-D.
    if len(scale_shape) == len(weight_shape) and len(weight_shape) in (2, 3):
        blocks = tuple(-(-d // BLOCK) for d in weight_shape[-2:])
        if tuple(scale_shape[-2:]) == blocks and (
            len(weight_shape) == 2 or scale_shape[0] == weight_shape[0]
        ):
            return ScaleKind.BLOCK
    raise CheckpointError(
        f"scale of {key!r} has shape {list(scale_shape)} which fits neither per-tensor, per-expert, "
        f"per-channel ([rows, 1]) nor 128x128 blocks of its weight shape {list(weight_shape)}"
    )


# The dtypes e8m0 exponents are stored as: uint8 (MiniMax-M3) or safetensors' own F8_E8M0 (DeepSeek-V4,
# and transformers' ue8m0 FP8 quantizer).
E8M0_DTYPES = ("U8", "F8_E8M0")


def classify_e8m0_scale(
    key: str, weight_shape: tuple[int, ...], scale: tuple[str, tuple[int, ...]]
) -> ScaleKind:
    """e8m0 exponents of an FP8 weight: one per 32 columns of a row (MXFP8), or, stored as F8_E8M0, one per
    128x128 block: a power-of-two block scale, which is plain block FP8 (a one-block matrix's reads as
    per-tensor, as a float scale's does)."""
    dtype, shape = scale
    if len(weight_shape) >= 2:
        per_32 = scale_shape(ScaleKind.MXFP8, weight_shape)
        blocks = scale_shape(ScaleKind.BLOCK, weight_shape)
        if dtype == "F8_E8M0" and tuple(shape) == blocks:
            return classify_scale(key, weight_shape, shape)
        if tuple(shape) == per_32:
            return ScaleKind.MXFP8
        grids = f"{list(per_32)} (one per {mxfp4.BLOCK} columns of a row) or, as F8_E8M0, {list(blocks)} (per block)"
    else:
        grids = "none: only a matrix has them"
    raise CheckpointError(
        f"scale of {key!r} is {dtype} {list(shape)}: e8m0 exponents of a weight of shape {list(weight_shape)} "
        f"are {grids}"
    )


@cache
def shard_period(rows: int, scale_rows: int) -> int | None:
    """The rows of one shard of a sharded block grid with ``scale_rows`` scale rows over ``rows`` rows: the
    grid of the fewest (two or more) equal shards that fits, None where none does. Read from the shapes
    alone, so every step expands a recorded scale the same way; ``classify_sharded`` refuses a checkpoint
    whose configured shard count is not that one."""
    for n in range(2, scale_rows + 1):  # every shard has a scale row
        if rows % n == 0 and n * -(-(rows // n) // BLOCK) == scale_rows:
            return rows // n
    return None


def classify_sharded(
    key: str, weight_shape: tuple[int, ...], scale_shape_: tuple[int, ...], shards: int, why: str
) -> ScaleKind:
    """The scale of a weight saved as ``shards`` equal row shards (``why``: where that count comes from),
    each with a 128x128 grid of its own; plain blocks where the shards end on block boundaries."""
    if len(weight_shape) != 2 or weight_shape[0] % shards:
        raise CheckpointError(
            f"{key!r} has shape {list(weight_shape)}, which does not split into {shards} equal row shards ({why})"
        )
    period = weight_shape[0] // shards
    if period % BLOCK == 0:
        return classify_scale(key, weight_shape, scale_shape_)
    want = (shards * -(-period // BLOCK), -(-weight_shape[1] // BLOCK))
    if tuple(scale_shape_) != want:
        raise CheckpointError(
            f"scale of {key!r} has shape {list(scale_shape_)}; {shards} row shards of {period} rows ({why}), "
            f"each with its own {BLOCK}x{BLOCK} grid, need {list(want)}"
        )
    if shard_period(weight_shape[0], want[0]) != period:
        raise CheckpointError(
            f"scale of {key!r} {list(scale_shape_)} also fits fewer than {shards} row shards of its weight "
            f"{list(weight_shape)}: the grid is ambiguous, so Recast does not read it"
        )
    return ScaleKind.SHARDED


def expand_scale(kind: ScaleKind, scale: torch.Tensor, rows: slice, shape: tuple[int, ...]) -> torch.Tensor:
    """The fp32 scale broadcastable over ``weight[rows]`` (a dim-0 slice of a tensor of ``shape``)."""
    if kind is ScaleKind.MXFP4 or kind.flat_fp4:
        return mxfp4.expand(scale[rows])
    if kind is ScaleKind.MXFP8:
        return mxfp4.expand(scale[rows])[..., : shape[-1]]
    s = scale.float()
    if kind is ScaleKind.SHARDED:  # any rows: each row's scale row, gathered
        period = shard_period(shape[0], s.shape[0])
        r = torch.arange(rows.start, rows.stop, device=s.device)
        return s[(r // period) * -(-period // BLOCK) + (r % period) // BLOCK].repeat_interleave(BLOCK, 1)[
            :, : shape[-1]
        ]
    if kind is ScaleKind.PER_TENSOR:
        return s.reshape(())
    if kind is ScaleKind.PER_EXPERT:
        return s.reshape(-1)[rows].reshape(-1, 1, 1)
    if kind is ScaleKind.PER_CHANNEL:
        return s[rows]
    r, c = shape[-2], shape[-1]
    if len(shape) == 2:
        size = block_size(kind)
        lo, hi = rows.start, rows.stop
        if lo % size:
            raise ValueError("block-scaled row slices must start on a block boundary")
        s = s[lo // size : -(-hi // size)]
        return s.repeat_interleave(size, 0)[: hi - lo].repeat_interleave(size, 1)[:, :c]
    s = s[rows]
    return s.repeat_interleave(BLOCK, -2)[:, :r].repeat_interleave(BLOCK, -1)[..., :c]


def block_size(kind: ScaleKind) -> int:
    """The rows (and columns) one scale of a block kind covers."""
    return 32 if kind is ScaleKind.BLOCK32 else BLOCK


def value_shape(kind: ScaleKind | None, stored: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the value a quantized tensor stored as ``stored`` holds (MXFP4 and FP4 pack two per byte)."""
    if kind is ScaleKind.MXFP4:
        return mxfp4.value_shape(stored)
    return mxfp4.flat_value_shape(stored) if kind is not None and kind.flat_fp4 else stored


def stored_shape(kind: ScaleKind | None, value: tuple[int, ...]) -> tuple[int, ...]:
    if kind is ScaleKind.MXFP4:
        return mxfp4.stored_shape(value)
    return mxfp4.flat_stored_shape(value) if kind is not None and kind.flat_fp4 else value


def dequantize_rows(
    q: torch.Tensor,
    kind: ScaleKind,
    scale: torch.Tensor,
    rows: slice,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rows ``rows`` of a tensor of ``shape`` dequantized by plain arithmetic (never tables)."""
    if kind is ScaleKind.MXFP4:
        return mxfp4.dequantize(q, scale[rows], dtype)
    if kind.flat_fp4:
        return mxfp4.dequantize(mxfp4.unflatten(q), scale[rows], dtype)
    return dequantize(q, expand_scale(kind, scale, rows, shape), dtype)


def quantize_rows(
    w: torch.Tensor, kind: ScaleKind, scale: torch.Tensor, rows: slice, shape: tuple[int, ...]
) -> torch.Tensor:
    """Rows ``rows`` of a tensor of ``shape`` quantized with a recorded scale by plain arithmetic."""
    if kind is ScaleKind.MXFP4:
        return mxfp4.quantize(w, scale[rows])
    if kind.flat_fp4:
        codes = mxfp4.flatten(mxfp4.quantize(w, scale[rows]))
        return codes.view(torch.uint8) if kind is ScaleKind.FP4_U8 else codes
    return quantize(w, expand_scale(kind, scale, rows, shape))


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(q.float() * scale).to(dtype)``, with ``scale`` already expanded by ``expand_scale``."""
    return (q.float() * scale).to(dtype)


def quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(w / s, ±448)`` cast to e4m3, with ``scale`` already expanded."""
    return (w.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def fresh_scale(kind: ScaleKind, w: torch.Tensor) -> torch.Tensor:
    """amax / 448 per tensor, per output row or per 128x128 block (per expert for 3-D); an all-zero
    group gets 1."""
    a = w.float().abs()
    if kind is ScaleKind.PER_TENSOR:
        amax = a.max() if a.numel() else torch.zeros((), device=a.device)
    elif kind is ScaleKind.PER_CHANNEL:
        amax = a.amax(dim=-1, keepdim=True)
    else:
        r, c = a.shape[-2], a.shape[-1]
        rb, cb = -(-r // BLOCK), -(-c // BLOCK)
        padded = torch.nn.functional.pad(a, (0, cb * BLOCK - c, 0, rb * BLOCK - r))
        amax = padded.reshape(*a.shape[:-2], rb, BLOCK, cb, BLOCK).amax(dim=(-3, -1))
    return scale_from_amax(amax)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 (1 where amax is 0) as a true tensor division.

    CUDA divides by a Python scalar as a multiply by its reciprocal, which rounds differently from
    the CPU; dividing by a tensor of 448s is IEEE division on both, so the scales agree bit for bit.
    """
    s = amax.float() / torch.full_like(amax, FP8_MAX, dtype=torch.float32)
    return torch.where(s == 0, torch.ones_like(s), s)


def scale_shape(kind: ScaleKind, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind is ScaleKind.PER_TENSOR:
        return ()
    if kind is ScaleKind.PER_EXPERT:
        return (shape[0], 1, 1)
    if kind is ScaleKind.PER_CHANNEL:
        return (*shape[:-1], 1)
    if kind is ScaleKind.MXFP8 or kind.flat_fp4:
        return (*shape[:-1], -(-shape[-1] // mxfp4.BLOCK))
    size = block_size(kind)
    return (*shape[:-2], -(-shape[-2] // size), -(-shape[-1] // size))


@dataclass
class ErrorStats:
    """Worst-case figures of a lossy step, for the per-tensor report."""

    max_abs_error: float
    snr_db: float
    within_bound: bool
    worst_bound_ratio: float


def bounded_error(original: torch.Tensor, restored: torch.Tensor, scale: torch.Tensor | None) -> ErrorStats:
    """Check ``|w - deq(q(w))| <= 2^-4 |w| + 2^-10 s`` per element (s expanded, or None for a cast).

    For a plain dtype cast (no scale) the bound is the half-ulp of the narrower dtype.
    """
    w = original.float()
    d = (w - restored.float()).abs()
    if scale is None:
        eps = 2.0 ** -(torch.finfo(restored.dtype).nmant + 1) if restored.dtype.is_floating_point else 0.0
        bound = eps * w.abs() + torch.finfo(restored.dtype).smallest_normal * eps
    else:
        bound = 2.0**-4 * w.abs() + 2.0**-10 * scale
    # fp32 rounding of w / s and of the product adds at most a few ulps of fp32 on top.
    bound = bound * (1 + 2.0**-20) + torch.finfo(torch.float32).tiny
    ratio = float((d / bound).max()) if d.numel() else 0.0
    signal = float(w.pow(2).sum())
    noise = float(d.pow(2).sum())
    snr = (
        float("inf")
        if noise == 0
        else 10.0 * torch.log10(torch.tensor(signal / noise)).item()
        if signal
        else 0.0
    )
    return ErrorStats(float(d.max()) if d.numel() else 0.0, snr, ratio <= 1.0, ratio)


def decode(
    q: torch.Tensor,
    kind: ScaleKind,
    scale: torch.Tensor,
    rows: slice,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantized rows ``rows`` of a tensor of ``shape``: table lookups on the CPU where they pay.

    ``q`` may be a view with its last two dims swapped (the experts' transpose) if ``kind.tabulated``.
    """
    groups = 1 if kind is ScaleKind.PER_TENSOR else rows.stop - rows.start
    if kind.tabulated and lut.applies(q, groups, lut.MIN_DECODE):
        s = scale.float().reshape(-1)
        return lut.decode(q, s if kind is ScaleKind.PER_TENSOR else s[rows], dtype, dequantize)
    return dequantize_rows(q, kind, scale, rows, shape, dtype)


def encode(
    w: torch.Tensor, kind: ScaleKind, scale: torch.Tensor, rows: slice, shape: tuple[int, ...]
) -> torch.Tensor:
    """``quantize`` with a recorded scale over rows ``rows``; tables on the CPU for 16-bit values."""
    groups = 1 if kind is ScaleKind.PER_TENSOR else rows.stop - rows.start
    if (
        kind.tabulated
        and w.element_size() == 2
        and w.is_floating_point()
        and lut.applies(w, groups, lut.MIN_ENCODE)
    ):
        s = scale.float().reshape(-1)
        return lut.encode(w, s if kind is ScaleKind.PER_TENSOR else s[rows], quantize)
    return quantize_rows(w, kind, scale, rows, shape)


def exact_codes(
    w: torch.Tensor, kind: ScaleKind, scale: torch.Tensor, rows: slice, shape: tuple[int, ...]
) -> torch.Tensor | None:
    """Per element, the code that ``w`` is exactly the dequantization of and quantizes back to (256
    where none), by table on the CPU; None where tables do not apply (then check both directions)."""
    groups = 1 if kind is ScaleKind.PER_TENSOR else rows.stop - rows.start
    if (
        not kind.tabulated
        or w.element_size() != 2
        or not w.is_floating_point()
        or not lut.applies(w, groups, lut.MIN_ENCODE)
    ):
        return None
    s = scale.float().reshape(-1)
    return lut.exact(w, s if kind is ScaleKind.PER_TENSOR else s[rows], dequantize, quantize)
