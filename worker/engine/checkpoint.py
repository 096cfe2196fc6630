"""A checkpoint opened from headers only: config, index, and where every tensor lives."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError
from .safetensors_io import ShardHeader, TensorInfo, parse_header
from .storage import Source, check_relative, read_all

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
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

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def text_config(self) -> dict[str, Any]:
        return self.config.get("text_config") or self.config

    def shard_bytes(self, name: str) -> int:
        return sum(t.nbytes for t in self.headers[name].tensors.values())


def _load_json(source: Source, name: str) -> tuple[dict[str, Any], bytes]:
    raw = read_all(source, name)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source.description}/{name}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{source.description}/{name}: expected a JSON object")
    return data, raw


def open_checkpoint(source: Source) -> Checkpoint:
    """Read config, index and every shard header; validate that the index and shards agree."""
    where = source.description
    if not source.exists("config.json"):
        raise CheckpointError(f"{where}: no config.json; is this a Hugging Face style checkpoint directory?")
    config, config_raw = _load_json(source, "config.json")
    index_raw = None
    if source.exists(INDEX):
        index, index_raw = _load_json(source, INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{where}/{INDEX}: missing or empty 'weight_map'")
        for key, name in weight_map.items():
            if not isinstance(name, str):
                raise CheckpointError(f"{where}/{INDEX}: weight_map entry for {key!r} is not a file name")
            check_relative(name, f"{where}/{INDEX} (key {key!r})")
        shards = sorted(set(weight_map.values()))
    elif source.exists(SINGLE):
        weight_map, shards = None, [SINGLE]
    else:
        raise CheckpointError(f"{where}: neither {INDEX} nor {SINGLE} found")
    headers: dict[str, ShardHeader] = {}
    tensors: dict[str, TensorInfo] = {}
    for name in shards:
        if not source.exists(name):
            raise CheckpointError(f"{where}/{INDEX}: names shard {name} which does not exist")
        header = parse_header(source, name)
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
    sidecar = _load_json(source, SIDECAR)[0] if source.exists(SIDECAR) else None
    weights = set(shards) | {INDEX, "config.json", SIDECAR, SIDECAR_TENSORS, MANIFEST}
    extra = [n for n in source.list() if n not in weights and not n.endswith(".safetensors")]
    return Checkpoint(source, config, shards, headers, tensors, index_raw, config_raw, sidecar, extra)
