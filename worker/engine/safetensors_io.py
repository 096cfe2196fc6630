"""Safetensors headers and tensor bytes, read by byte range and written as a stream.

The engine never asks the safetensors library to open a whole file: planning needs only the headers
(8 bytes of length + JSON), which remote stores can serve with ranged reads, and writing streams
tensors one at a time into a file whose header is known up front, so memory stays near one work unit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

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
    "F8_E8M0": torch.float8_e8m0fnu,  # e8m0 exponents: DeepSeek-V4's scales
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


def tensor_from_bytes(info: TensorInfo, data: bytes | bytearray | memoryview | torch.Tensor) -> torch.Tensor:
    """Wrap raw little-endian bytes as a tensor without copying them."""
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    flat = data if isinstance(data, torch.Tensor) else torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(info.torch_dtype).reshape(info.shape)


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
