"""Everything beside the weight shards, and putting a finished conversion in place.

The metadata comes last because it describes the shards: the sidecar scales, config, the files carried
over unchanged, the index (which defines the checkpoint), then ``recast.json`` with every file's
SHA-256 and the verification summary, and ``SHA256SUMS`` over all of it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .adapters import Adapter
from .checkpoint import INDEX, MANIFEST, SIDECAR, SIDECAR_TENSORS, Checkpoint, metadata_of
from .direction import Direction
from .options import Options
from .report import Report
from .safetensors_io import PlannedTensor
from .shard_stream import ShardStream, planned_header, slots_of


def write_metadata(
    ckpt: Checkpoint,
    stage: Path,
    direction: Direction,
    adapter: Adapter,
    opts: Options,
    scales: dict[str, torch.Tensor],
) -> list[str]:
    """Every metadata file: the ones the plan fixes (``write_fixed_metadata``), then recast.json."""
    return [
        *write_fixed_metadata(ckpt, stage, direction, opts, scales),
        write_record(ckpt, stage, direction, adapter, opts),
    ]


def write_fixed_metadata(
    ckpt: Checkpoint, stage: Path, direction: Direction, opts: Options, scales: dict[str, torch.Tensor]
) -> list[str]:
    """Sidecar scales (``scales``: the source's, read once), carried files, config and index.

    The plan fixes all of them, so a service writes them beside the shards rather than after the last;
    only recast.json waits for the shards' hashes and verification."""
    source = ckpt.source
    layout = direction.layout
    written = [*ckpt.extra_files, "config.json", INDEX]
    for name in ckpt.extra_files:
        target = stage / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_range(name, 0, source.size(name)))
    native_out = opts.to == "native"
    prev = ckpt.sidecar or {}
    if native_out and direction.sidecar_scales:
        tensors = [
            PlannedTensor(k, ckpt.tensors[k].dtype, ckpt.tensors[k].shape) for k in direction.sidecar_scales
        ]
        stream = ShardStream(stage / SIDECAR_TENSORS, planned_header(tensors), slots_of(tensors))
        for k in direction.sidecar_scales:
            stream.put(k, 0, scales[k])
        stream.close()
        written.insert(0, SIDECAR_TENSORS)
    restored = (
        not native_out
        and layout.raw_headers
        and prev.get("source", {}).get("config") == _comparable(direction.config)
    )
    config_bytes = (
        prev["source"]["config_raw"].encode()
        if restored
        else (json.dumps(direction.config, indent=2) + "\n").encode()
    )
    (stage / "config.json").write_bytes(config_bytes)
    if restored and prev["source"].get("index"):
        (stage / INDEX).write_text(prev["source"]["index"])
    else:
        # an hf output keeps what the source's index says beside the sizes (MiMo's tp_size: how its fused
        # qkv_proj is laid out)
        kept = (
            {} if native_out else metadata_of(prev.get("source", {}).get("index") if prev else ckpt.index_raw)
        )
        index = {
            "metadata": {**kept, "total_size": layout.total_bytes()},
            "weight_map": dict(sorted(layout.where.items())),
        }
        (stage / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return written


def write_record(ckpt: Checkpoint, stage: Path, direction: Direction, adapter: Adapter, opts: Options) -> str:
    """recast.json as the plan knows it (no file is read): what was converted, how, and from what; a
    native output also carries the source's headers, config and index, so the way back is exact.
    ``finish_sidecar`` adds the hashes and the verification."""
    native_out = opts.to == "native"
    sidecar: dict[str, Any] = {
        "recast": 1,
        "format": "native" if native_out else "hf",
        "adapter": adapter.name,
        "layout": adapter.layout(list(ckpt.tensors)),
        "options": {k: v for k, v in asdict(opts).items() if k not in ("overwrite",)},
    }
    source: dict[str, Any] = {
        "location": opts.source_location or ckpt.source.description,
        "revision": opts.source_revision,
    }
    if native_out:
        sidecar["plan"] = direction.plan.to_json()
        source |= {
            "config": ckpt.config,
            "dtypes": {k: v.dtype for k, v in ckpt.tensors.items()},
            "headers": {n: base64.b64encode(h.raw).decode() for n, h in ckpt.headers.items()},
            "index": ckpt.index_raw.decode() if ckpt.index_raw else None,
            "config_raw": ckpt.config_raw.decode(),
        }
    sidecar["source"] = source
    (stage / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
    return SIDECAR


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def finish_sidecar(stage: Path, report: Report, files: dict[str, str]) -> list[str]:
    """Record the verification and every file's SHA-256 in recast.json; write the SHA256SUMS manifest.

    The manifest covers every published file, recast.json included, in ``sha256sum -c`` format.
    """
    sidecar = json.loads((stage / SIDECAR).read_text())
    sidecar["files"] = dict(sorted(files.items()))
    sidecar["verification"] = report.summary()
    (stage / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
    report.files = sidecar["files"]
    every = {**sidecar["files"], SIDECAR: file_sha256(stage / SIDECAR)}
    (stage / MANIFEST).write_text("".join(f"{h}  {n}\n" for n, h in sorted(every.items())))
    return [SIDECAR, MANIFEST]


def publish_dir(stage: Path, dst: Path) -> None:
    """Swap the staged directory into place; an old target is removed only after the swap."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(stage, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
