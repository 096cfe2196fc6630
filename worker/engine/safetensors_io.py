"""Safetensors headers and tensor bytes, read by byte range and written as a stream.

The engine never asks the safetensors library to open a whole file: planning needs only the headers
(8 bytes of length + JSON), which remote stores can serve with ranged reads, and writing streams
tensors one at a time into a file whose header is known up front, so memory stays near one work unit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import CheckpointError
from .header_schema import HeaderMetadata, TensorEntry, TensorTable, check, check_layout, load_json
from .storage import Source

# Largest header we accept: real shards have a few hundred KB of JSON; anything bigger is corrupt. The
# safetensors library's own limit, so a header it refuses for size is refused here too.
MAX_HEADER_BYTES = 100_000_000

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range in that file."""

    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class ShardHeader:
    """A parsed shard header; ``raw`` is kept so a restored shard can be written byte for byte."""

    file: str
    raw: bytes
    metadata: dict[str, str] | None
    tensors: dict[str, TensorInfo]


def parse_header(source: Source, name: str) -> ShardHeader:
    """Read and validate one shard's header; errors name the file, the tensor and the field."""
    size = source.size(name)
    if size < 8:
        raise CheckpointError(f"{name}: file is {size} bytes, too short to be a safetensors shard")
    length = int.from_bytes(source.read_range(name, 0, 8), "little")
    if length > MAX_HEADER_BYTES or length + 8 > size:
        raise CheckpointError(
            f"{name}: header length field says {length} bytes but the file holds {size} bytes "
            f"(and headers are at most {MAX_HEADER_BYTES}); the shard is truncated or not a safetensors file"
        )
    raw = source.read_range(name, 8, 8 + length)
    metadata, entries = check_header(raw, name, size - 8 - length)
    base = 8 + length
    tensors = {
        key: TensorInfo(
            key, name, e.dtype, tuple(e.shape), base + e.data_offsets[0], base + e.data_offsets[1]
        )
        for key, e in entries.items()
    }
    return ShardHeader(name, raw, metadata, tensors)


def check_header(
    raw: bytes, where: str, data_bytes: int | None
) -> tuple[dict[str, str] | None, dict[str, TensorEntry]]:
    """Validate header JSON against the schema and its offsets against ``data_bytes`` of tensor data.

    Also used for headers recorded in recast.json, which have no file behind them (``data_bytes`` None).
    """
    header = load_json(raw, where)
    dtypes = DTYPES.keys()
    metadata = None
    if isinstance(header, dict) and "__metadata__" in header:
        metadata = check(HeaderMetadata, {"__metadata__": header.pop("__metadata__")}, where, dtypes).metadata
    entries = check(TensorTable, header, where, dtypes, first="tensor")
    check_layout(where, entries, {k: v.itemsize for k, v in DTYPES.items()}, data_bytes)
    return metadata, entries


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def tensor_from_bytes(info: TensorInfo, data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Wrap raw little-endian bytes as a tensor without copying them."""
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(info.torch_dtype).reshape(info.shape)


def read_tensor(source: Source, info: TensorInfo) -> torch.Tensor:
    return tensor_from_bytes(info, bytearray(source.read_range(info.file, info.start, info.end)))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in safetensors order (C-contiguous, little-endian)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class PlannedTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return DTYPES[self.dtype].itemsize * _numel(self.shape)


def build_header(tensors: list[PlannedTensor], metadata: dict[str, str] | None) -> bytes:
    """Header JSON padded with spaces to 8 bytes, as the safetensors library writes it."""
    body: dict[str, object] = {}
    if metadata is not None:
        body["__metadata__"] = metadata
    offset = 0
    for t in tensors:
        body[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(body, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


class ShardWriter:
    """Writes one shard whose layout is fixed in advance, tensor by tensor, under a temporary name.

    Tensors may arrive in any order; each is written at its planned offset, so peak memory is one
    tensor, not one shard. ``close`` checks every planned tensor arrived, then renames into place.
    """

    def __init__(self, path: Path, header: bytes, offsets: dict[str, tuple[int, int, str, tuple[int, ...]]]):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial")
        self._offsets = offsets
        self._pending = set(offsets)
        self._fh: BinaryIO = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._fh.write(len(header).to_bytes(8, "little"))
        self._fh.write(header)
        self._base = 8 + len(header)

    @classmethod
    def planned(
        cls, path: Path, tensors: list[PlannedTensor], metadata: dict[str, str] | None
    ) -> ShardWriter:
        header = build_header(tensors, metadata)
        return cls(path, header, _layout(tensors))

    @classmethod
    def from_raw_header(cls, path: Path, raw: bytes) -> ShardWriter:
        """Reproduce a source shard's exact header, so restored bytes hash like the original."""
        header = json.loads(raw)
        header.pop("__metadata__", None)
        offsets = {
            k: (v["data_offsets"][0], v["data_offsets"][1], v["dtype"], tuple(v["shape"]))
            for k, v in header.items()
        }
        return cls(path, raw, offsets)

    def write(self, key: str, t: torch.Tensor, row: int = 0, last: bool = True) -> None:
        """Write ``t`` as rows ``row…`` of tensor ``key``; ``last`` marks the tensor complete."""
        lo, _, dtype, shape = self._offsets[key]
        if (
            DTYPES[dtype] != t.dtype
            or tuple(t.shape[1:]) != shape[1:]
            or row + (t.shape[0] if t.dim() else 1) > (shape[0] if shape else 1)
        ):
            raise CheckpointError(
                f"{self.path.name}: tensor {key!r} piece is {t.dtype} {list(t.shape)} at row {row} but the plan "
                f"says {dtype} {list(shape)}"
            )
        row_bytes = DTYPES[dtype].itemsize * _numel(shape[1:]) if shape else 0
        self._fh.seek(self._base + lo + row * row_bytes)
        self._fh.write(tensor_bytes(t))
        if last:
            self._pending.discard(key)

    def close(self) -> None:
        if self._pending:
            self.abort()
            raise CheckpointError(f"{self.path.name}: never received {sorted(self._pending)[:5]}")
        end = self._base + max((hi for _, hi, _, _ in self._offsets.values()), default=0)
        self._fh.truncate(end)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._fh.close()
        self.tmp.unlink(missing_ok=True)


def _layout(tensors: list[PlannedTensor]) -> dict[str, tuple[int, int, str, tuple[int, ...]]]:
    out = {}
    offset = 0
    for t in tensors:
        out[t.key] = (offset, offset + t.nbytes, t.dtype, t.shape)
        offset += t.nbytes
    return out
