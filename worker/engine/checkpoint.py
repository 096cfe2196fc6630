"""A checkpoint opened from headers only: config, index, and where every tensor lives."""

from __future__ import annotations

import base64
import binascii
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .errors import CheckpointError
from .header_schema import Index, ModelConfig, Sidecar, check, load_json
from .safetensors_io import DTYPES, MAX_HEADER_BYTES, ShardHeader, TensorInfo, check_header, parse_header
from .storage import Source, check_relative

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
HEADER_READERS = 16
SIDECAR = "recast.json"
SIDECAR_TENSORS = "recast-scales.safetensors"
MANIFEST = "SHA256SUMS"


@dataclass
class Checkpoint:
    source: Source
    config: dict[str, Any]
    shards: list[str]
    headers: dict[str, ShardHeader]
    tensors: dict[str, TensorInfo]
    index_raw: bytes | None
    config_raw: bytes
    sidecar: dict[str, Any] | None = None
    extra_files: list[str] = field(default_factory=list)

    @cached_property
    def index_metadata(self) -> dict[str, Any]:
        """The ``metadata`` of the index (MiMo-V2.5's ``tp_size`` is there), empty without one; parsed once,
        though planning asks for it per fused tensor."""
        return metadata_of(self.index_raw)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def text_config(self) -> dict[str, Any]:
        return self.config.get("text_config") or self.config

    def shard_bytes(self, name: str) -> int:
        return sum(t.nbytes for t in self.headers[name].tensors.values())


def _load_json(source: Source, name: str, schema: Any) -> tuple[dict[str, Any], bytes]:
    """Read a small JSON file whole, parse it with bounded depth and check it against ``schema``."""
    where = f"{source.description}/{name}"
    size = source.size(name)
    if size > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}: {size} bytes is too large for a JSON file of a checkpoint")
    raw = source.read_range(name, 0, size)
    data = load_json(raw, where)
    check(schema, data, where, DTYPES)
    return data, raw


def _check_sidecar(sidecar: dict[str, Any], where: str) -> None:
    """What recast.json hands back verbatim must itself be valid: recorded headers, index and config."""
    source = sidecar.get("source", {})
    for name, encoded in source.get("headers", {}).items():
        check_relative(name, f"{where} (source.headers)")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise CheckpointError(
                f"{where}: field {f'source.headers[{name!r}]'!r} is not base64 ({exc})"
            ) from None
        check_header(raw, f"{where} (source.headers[{name!r}])", None)
    for field_name, schema in (("index", Index), ("config_raw", ModelConfig)):
        if source.get(field_name):
            at = f"{where} (source.{field_name})"
            check(schema, load_json(source[field_name].encode(), at), at, DTYPES)


def _shard_exists(source: Source, name: str) -> bool:
    """Whether an index-named shard is there; a name the OS cannot even look up (too long) is bad input."""
    try:
        return source.exists(name)
    except OSError as exc:
        raise CheckpointError(
            f"{source.description}/{INDEX}: names shard {name!r}, which cannot be looked up ({exc.strerror})"
        ) from None


def metadata_of(index_raw: str | bytes | None) -> dict[str, Any]:
    """The ``metadata`` of an index's text (a checkpoint's, or the one recast.json records), empty without."""
    metadata = json.loads(index_raw).get("metadata") if index_raw else None
    return metadata if isinstance(metadata, dict) else {}


def open_checkpoint(source: Source) -> Checkpoint:
    """Read config, index and every shard header; validate that the index and shards agree."""
    where = source.description
    if not source.exists("config.json"):
        raise CheckpointError(f"{where}: no config.json; is this a Hugging Face style checkpoint directory?")
    config, config_raw = _load_json(source, "config.json", ModelConfig)
    index_raw = None
    if source.exists(INDEX):
        index, index_raw = _load_json(source, INDEX, Index)
        weight_map = index["weight_map"]
        for key, name in weight_map.items():
            check_relative(name, f"{where}/{INDEX} (key {key!r})")
        shards = sorted(set(weight_map.values()))
    elif source.exists(SINGLE):
        weight_map, shards = None, [SINGLE]
    else:
        raise CheckpointError(f"{where}: neither {INDEX} nor {SINGLE} found")
    headers: dict[str, ShardHeader] = {}
    tensors: dict[str, TensorInfo] = {}
    for name in shards:
        if not _shard_exists(source, name):
            raise CheckpointError(f"{where}/{INDEX}: names shard {name} which does not exist")
    # Headers are read concurrently: a remote store answers each ranged read in tens of milliseconds.
    with ThreadPoolExecutor(max_workers=HEADER_READERS) as pool:
        parsed = list(pool.map(lambda name: parse_header(source, name), shards))
    for name, header in zip(shards, parsed, strict=True):
        headers[name] = header
        for key, info in header.tensors.items():
            if key in tensors:
                raise CheckpointError(
                    f"{where}: tensor {key!r} appears in both {tensors[key].file} and {name}"
                )
            tensors[key] = info
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in tensors or tensors[key].file != name:
                raise CheckpointError(
                    f"{where}/{INDEX}: says {key!r} is in {name}, but that shard has no such tensor"
                )
        stray = sorted(set(tensors) - set(weight_map))
        if stray:
            raise CheckpointError(f"{where}: tensors {stray[:3]} are in shards but missing from {INDEX}")
    sidecar = _load_json(source, SIDECAR, Sidecar)[0] if source.exists(SIDECAR) else None
    if sidecar is not None:
        _check_sidecar(sidecar, f"{where}/{SIDECAR}")
    weights = set(shards) | {INDEX, "config.json", SIDECAR, SIDECAR_TENSORS, MANIFEST}
    extra = [n for n in source.list() if n not in weights and not n.endswith(".safetensors")]
    return Checkpoint(source, config, shards, headers, tensors, index_raw, config_raw, sidecar, extra)
