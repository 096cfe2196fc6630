"""Reading tensor rows, and the value of an hf or native tensor computed from a checkpoint.

These are the two directions of every adapter operation, evaluated piece by piece along dim 0 (rows
of a matrix, experts of a 3-D tensor), so no tensor is ever materialised whole unless it is small.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from .checkpoint import Checkpoint
from .errors import CheckpointError
from .fp8 import BLOCK, ScaleKind, block_size, decode, value_shape
from .hostpool import HostPool
from .keymap import NativeTensor, Quant
from .operations import OPERATIONS
from .safetensors_io import TensorInfo, tensor_from_bytes
from .storage import Source


@dataclass
class TensorSource:
    """Tensors addressable by key: a checkpoint's shards plus, optionally, a sidecar scale file."""

    source: Source
    tensors: dict[str, TensorInfo]
    extra: dict[str, TensorInfo] = field(default_factory=dict)

    @classmethod
    def of(cls, ckpt: Checkpoint, extra: dict[str, TensorInfo] | None = None) -> TensorSource:
        return cls(ckpt.source, ckpt.tensors, extra or {})

    def info(self, key: str) -> TensorInfo:
        return self.tensors.get(key) or self.extra[key]

    def rows(
        self, key: str, r0: int | None = None, r1: int | None = None, pool: HostPool | None = None
    ) -> torch.Tensor:
        """Rows ``r0:r1`` of ``key`` (all of it when ``r0`` is None), read into a buffer of ``pool``'s
        when one is given."""
        info = self.info(key)
        if not info.shape or r0 is None:
            start, end, shape = info.start, info.end, info.shape
        else:
            r1 = min(r1 if r1 is not None else info.shape[0], info.shape[0])
            row = info.nbytes // info.shape[0] if info.shape[0] else 0
            start, end, shape = info.start + r0 * row, info.start + r1 * row, (r1 - r0, *info.shape[1:])
        where = TensorInfo(key, info.file, info.dtype, shape, start, end)
        read_into = getattr(self.source, "read_into", None)
        if read_into is None or end == start:
            return tensor_from_bytes(where, bytearray(self.source.read_range(info.file, start, end)))
        buf = pool.take(end - start) if pool is not None else torch.empty(end - start, dtype=torch.uint8)
        read_into(info.file, start, memoryview(buf.numpy()))
        return tensor_from_bytes(where, buf)


# Concurrent small reads: a remote store answers each in tens of milliseconds, so a checkpoint's hundreds
# of scales or headers read one after another would take seconds.
READERS = 16


def read_many(src: TensorSource, keys: list[str]) -> dict[str, torch.Tensor]:
    """Whole tensors ``keys`` (small ones: scales), read concurrently."""
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        return dict(zip(keys, pool.map(src.rows, keys), strict=True))


_remote_readers: ThreadPoolExecutor | None = None
_remote_lock = threading.Lock()


def _remote_pool() -> ThreadPoolExecutor:
    """One pool for every lane's remote reads, made on first use."""
    global _remote_readers
    with _remote_lock:
        if _remote_readers is None:
            _remote_readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="recast-fetch")
        return _remote_readers


def _forget_remote_pool() -> None:
    """In a forked child: the parent's pool threads did not come along, and a pool that believes it has
    idle threads would queue reads that nothing runs; the child makes its own on first use."""
    global _remote_readers, _remote_lock
    _remote_readers, _remote_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_remote_pool)


def fetch(
    src: TensorSource,
    quant: dict[str, Quant],
    requests: list[tuple[str, int | None, int | None]],
    pool: HostPool | None = None,
) -> dict[tuple[str, int | None, int | None], torch.Tensor]:
    """Read the bytes ``hf_value`` calls will need (on the pipeline's reading thread), with their scales.

    From a remote store (a source without ``read_into``: S3, the Hub) the pieces are read at once: each
    ranged GET waits tens of milliseconds for its first byte, and a unit's experts and scales read one
    after another spent a shard's time waiting. Local reads stay in order on the reading thread.
    """
    wanted: dict[tuple[str, int | None, int | None], None] = {}  # each piece once, in request order
    for key, r0, r1 in requests:
        wanted[(key, r0, r1)] = None
        if key in quant:
            wanted[(quant[key].scale, None, None)] = None
    if len(wanted) > 1 and getattr(src.source, "read_into", None) is None:
        got = list(_remote_pool().map(lambda p: src.rows(*p, pool), wanted))
    else:
        got = [src.rows(*p, pool) for p in wanted]
    return dict(zip(wanted, got, strict=True))


def forward_requests(t: NativeTensor, e0: int, e1: int) -> list[tuple[str, int | None, int | None]]:
    """The ``hf_value`` calls ``forward(t, e0, e1, …)`` will make."""
    return OPERATIONS[t.kind].requests(t, e0, e1)


def row_chunks(shape: tuple[int, ...], itemsize: int, budget: int, align: int = 1) -> list[tuple[int, int]]:
    """Split dim 0 into ranges of about ``budget`` bytes, each start a multiple of ``align``."""
    if not shape:
        return [(0, 1)]
    n = shape[0]
    row = itemsize
    for d in shape[1:]:
        row *= d
    step = max(1, budget // max(row, 1))
    if align > 1:
        step = max(align, step // align * align)
    return [(r, min(r + step, n)) for r in range(0, max(n, 1), step)] if n else [(0, 0)]


def hf_align(kind: ScaleKind | None, shape: tuple[int, ...]) -> int:
    return block_size(kind) if kind in (ScaleKind.BLOCK, ScaleKind.BLOCK32) and len(shape) == 2 else 1


def hf_value(
    src: TensorSource,
    quant: dict[str, Quant],
    key: str,
    r0: int | None,
    r1: int | None,
    dtype: torch.dtype,
    device: torch.device,
    fetched: dict[tuple[str, int | None, int | None], torch.Tensor] | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """Rows of hf tensor ``key``: dequantized to ``dtype`` (fp32 math) when it has a scale, else raw.

    ``fetched`` holds bytes already read by ``fetch`` (keyed like its requests); others are read now.
    ``transposed`` swaps the last two dims, before dequantizing where the scale allows (a table
    lookup then writes the transposed layout in the same pass), after it for per-channel and block scales.
    """
    fetched = fetched or {}
    info = src.info(key)
    q = quant.get(key)
    if q is not None and q.kind is ScaleKind.BLOCK and len(info.shape) == 2 and r0 is not None and r0 % BLOCK:
        # rows of a block-scaled tensor from inside a block (a split piece checked against its fused
        # source): decode from the block's first row, then drop the rows before r0
        lo = r0 - r0 % BLOCK
        x = hf_value(src, quant, key, lo, r1, dtype, device, fetched)[r0 - lo :]
        return x.transpose(-1, -2) if transposed else x
    x = fetched.get((key, r0, r1))
    if x is None:
        x = src.rows(key, r0, r1)
    x = x.to(device)
    if r0 is None or not info.shape:
        r0, r1 = 0, info.shape[0] if info.shape else 1
    early = transposed and (q is None or q.kind.tabulated)
    if early:
        x = x.transpose(-1, -2)
    if q is not None:
        scale = fetched.get((q.scale, None, None))
        scale = src.rows(q.scale) if scale is None else scale
        rows = slice(r0, min(r1, info.shape[0])) if info.shape else slice(0, 1)
        _check_exponents(key, q.scale, scale, rows, info.shape)  # on the host: no wait on the GPU
        x = decode(x, q.kind, scale.to(device), rows, info.shape, dtype)
    return x.transpose(-1, -2) if transposed and not early else x


def _check_exponents(
    key: str, scale_key: str, scale: torch.Tensor, rows: slice, shape: tuple[int, ...]
) -> None:
    """Refuse e8m0 exponents (stored uint8 or float8_e8m0fnu) of 0xFF, which is NaN, not a power of two:
    read as 2^128 they would decode to infinities that verification then reports only as bytes that
    differ. The rows' own exponents where the scale has one row per weight row, else all of them."""
    if scale.dtype not in (torch.uint8, torch.float8_e8m0fnu):
        return
    mine = scale[rows] if scale.dim() and shape and scale.shape[0] == shape[0] else scale
    nan = mine.view(torch.uint8) == 0xFF
    if bool(nan.any()):
        at = [int(i) for i in nan.nonzero()[0]]
        if mine is not scale:
            at[0] += rows.start
        raise CheckpointError(
            f"scale {scale_key!r} of {key!r} holds the e8m0 code 0xFF (NaN, not a power of two) at {at}: "
            "the checkpoint is damaged"
        )


def value_infos(tensors: dict[str, TensorInfo], quant: dict[str, Quant]) -> dict[str, TensorInfo]:
    """``tensors`` with each quantized tensor's shape the shape of its value (MXFP4 packs two per byte)."""
    return {
        k: replace(info, shape=value_shape(quant[k].kind, info.shape)) if k in quant else info
        for k, info in tensors.items()
    }


def native_shape(t: NativeTensor, infos: dict[str, TensorInfo]) -> tuple[int, ...]:
    return OPERATIONS[t.kind].native_shape(t, infos)


def forward(t: NativeTensor, e0: int, e1: int, get) -> torch.Tensor:
    """Native rows ``e0:e1`` of ``t`` from its hf parts; ``get(key, r0, r1, transposed=False)`` yields
    hf values (with their last two dims swapped when asked)."""
    return OPERATIONS[t.kind].forward(t, e0, e1, get)


def inverse_views(
    t: NativeTensor, native: torch.Tensor, e0: int
) -> list[tuple[str, int | None, int | None, torch.Tensor]]:
    """The hf tensors (or rows of them) that native rows starting at ``e0`` hold, as views (no copies),
    each with the hf rows it covers (None: all of it)."""
    return OPERATIONS[t.kind].inverse_views(t, native, e0)


def hf_shapes(t: NativeTensor, info: TensorInfo) -> dict[str, tuple[int, ...]]:
    """Shapes of the hf tensors that native tensor ``t`` (described by ``info``) splits into."""
    return OPERATIONS[t.kind].hf_shapes(t, info.shape)
