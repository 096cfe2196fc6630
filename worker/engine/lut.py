"""FP8 dequantization and re-quantization on the CPU as table lookups, bit for bit the arithmetic.

``(q.float() * s).to(bf16)`` is an elementwise function of the 256 possible codes of ``q`` once the
scale ``s`` is fixed, and ``quantize(w, s)`` is one of the 65,536 possible values of a 16-bit ``w``.
So for per-tensor and per-expert scales we evaluate the very same torch functions once over every
possible input and gather: one pass over memory instead of four, and the gather reads its input
through any strides, which folds the experts' transpose into it. On two cores this makes
dequantization about 4x and verification about 3x faster than the eager arithmetic. Block scales
change every 128 columns, where a table per block costs more than it saves: they keep the arithmetic,
as does the GPU, whose arithmetic is far faster than the disk anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# Below this many elements per scale the table costs more than the arithmetic it replaces.
MIN_DECODE = 1 << 12
MIN_ENCODE = 1 << 18
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
_ALL16: dict[torch.dtype, torch.Tensor] = {}


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of ``t``'s bits (any strides), as unsigned integers of the same width."""
    return t.view(_INT[t.element_size()]).numpy().view(f"u{t.element_size()}")


def decode(
    q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, dequantize: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """``dequantize(q, s, dtype)`` where ``scales`` holds one scale, or one per slice of dim 0."""
    out = torch.empty(q.shape, dtype=dtype)
    qn, on = _np(q), _np(out)
    flat = scales.reshape(-1)
    for i, s in enumerate(flat):
        table = _np(dequantize(_CODES, s.reshape(()), dtype))
        if len(flat) == 1:
            np.take(table, qn, out=on)
        else:
            np.take(table, qn[i], out=on[i])
    return out


def encode(w: torch.Tensor, scales: torch.Tensor, quantize: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``quantize(w, s)`` for a 16-bit ``w``, with one scale or one per slice of dim 0."""
    if w.dtype not in _ALL16:
        _ALL16[w.dtype] = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(w.dtype)
    everything = _ALL16[w.dtype]
    out = torch.empty(w.shape, dtype=torch.uint8)
    wn, on = _np(w), out.numpy()
    flat = scales.reshape(-1)
    for i, s in enumerate(flat):
        table = quantize(everything, s.reshape(())).view(torch.uint8).numpy()
        if len(flat) == 1:
            np.take(table, wn, out=on)
        else:
            np.take(table, wn[i], out=on[i])
    return out.view(torch.float8_e4m3fn)


def exact(
    w: torch.Tensor,
    scales: torch.Tensor,
    dequantize: Callable[..., torch.Tensor],
    quantize: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """For each element of a 16-bit ``w``, the FP8 code ``c`` with ``dequantize(c) == w`` bit for bit
    and ``quantize(w) == c``, or 256 where there is none: one gather proves both directions.

    Computed in ``w``'s memory order (a transposed view is gathered through its contiguous base) and
    returned as a view in ``w``'s logical order, as int16.
    """
    flat = scales.reshape(-1)
    order = sorted(range(w.dim()), key=lambda d: -w.stride(d))
    base = w.permute(order)
    if not base.is_contiguous() or (len(flat) > 1 and order[0] != 0):
        order, base = list(range(w.dim())), w.contiguous()
    out = torch.empty(base.shape, dtype=torch.int16)
    wn, on = _np(base), out.numpy().view("u2")
    codes = np.arange(256, dtype=np.uint16)
    for i, s in enumerate(flat):
        values = dequantize(_CODES, s.reshape(()), w.dtype)
        back = quantize(values, s.reshape(())).view(torch.uint8).numpy()
        table = np.full(1 << 16, 256, dtype=np.uint16)
        valid = back == codes  # codes whose value quantizes back to themselves (one per value at most)
        table[_np(values)[valid]] = codes[valid]
        if len(flat) == 1:
            np.take(table, wn, out=on)
        else:
            np.take(table, wn[i], out=on[i])
    inverse = sorted(range(len(order)), key=lambda d: order[d])
    return out.permute(inverse)


def applies(t: torch.Tensor, groups: int, minimum: int) -> bool:
    """Tables pay on the CPU when each scale covers enough elements."""
    return t.device.type == "cpu" and t.numel() >= minimum * max(groups, 1)
