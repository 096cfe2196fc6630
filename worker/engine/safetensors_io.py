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
from .storage import Source

# Largest header we accept: real shards have a few hundred KB of JSON; anything bigger is corrupt.
MAX_HEADER_BYTES = 100 * 1024 * 1024

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
    """Read and validate one shard's header; errors name the file and what is wrong."""
    size = source.size(name)
    if size < 8:
        raise CheckpointError(f"{name}: file is {size} bytes, too short to be a safetensors shard")
    length = int.from_bytes(source.read_range(name, 0, 8), "little")
    if length > MAX_HEADER_BYTES or length + 8 > size:
        raise CheckpointError(
            f"{name}: header length field says {length} bytes but the file holds {size} bytes; "
            "the shard is truncated or not a safetensors file"
        )
    raw = source.read_range(name, 8, 8 + length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{name}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    base = 8 + length
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for key, entry in header.items():
        try:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{name}: header entry for {key!r} is malformed") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{name}: tensor {key!r} has unsupported dtype {dtype}")
        expected = DTYPES[dtype].itemsize * _numel(shape)
        if hi - lo != expected or lo < 0:
            raise CheckpointError(
                f"{name}: tensor {key!r} spans {hi - lo} bytes but dtype {dtype} shape {list(shape)} "
                f"needs {expected}"
            )
        if base + hi > size:
            raise CheckpointError(
                f"{name}: tensor {key!r} ends at byte {base + hi} but the file has {size} bytes; "
                "the shard is truncated"
            )
        tensors[key] = TensorInfo(key, name, dtype, shape, base + lo, base + hi)
        spans.append((lo, hi))
    if base + max((hi for _, hi in spans), default=0) != size:
        raise CheckpointError(f"{name}: file size {size} does not match its header; the shard is damaged")
    return ShardHeader(name, raw, metadata, tensors)


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
