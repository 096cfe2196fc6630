"""Preflight: what a checkpoint is and what converting it would produce and need, from headers only."""

from __future__ import annotations

import math
import os
from typing import Any

from .adapters import Adapter, detect
from .checkpoint import open_checkpoint
from .encode import FRESH
from .formats import hf_side, is_native
from .fp8 import ScaleKind, value_shape
from .keymap import Quant, plan_from_native, source_quant
from .options import DTYPE_ARGS, STEP_BYTES
from .qformat import FORMAT_NAMES, FORMATS, QuantFormat, describe, source_format
from .safetensors_io import DTYPES
from .storage import Source, open_source
from .tensors import hf_shapes


def inspect(
    src: str | os.PathLike[str] | Source, adapter: str | None = None, dtype: str = "bf16"
) -> dict[str, Any]:
    ckpt = open_checkpoint(open_source(src))
    chosen = detect(ckpt.config, list(ckpt.tensors), adapter or (ckpt.sidecar or {}).get("adapter"))
    native = is_native(ckpt)
    # A native checkpoint's quantization is its recorded source's, which the way back restores.
    recorded = (ckpt.sidecar or {}).get("plan") or {}
    config, source_keys = hf_side(ckpt)
    fmt = source_format(config, source_keys)
    quant, companions = ({}, []) if native else source_quant(ckpt, fmt)
    if native:
        plan = plan_from_native(ckpt, chosen)
        hf_keys = list(dict.fromkeys(k for t in plan.tensors for k in hf_shapes(t, ckpt.tensors[t.key])))
        kept = plan.quant
    else:
        hf_keys, kept = [k for k in ckpt.tensors if k not in companions], quant
    kinds = sorted(
        {q.kind.value for q in quant.values()} or {q["kind"] for q in recorded.get("quant", {}).values()}
    )
    activation = "static" if any(q.activation for q in quant.values()) else ("dynamic" if quant else None)
    shard_sizes = [ckpt.shard_bytes(n) for n in ckpt.shards]
    itemsize = DTYPES[DTYPE_ARGS[dtype]].itemsize
    out_bytes = 0
    for key, info in ckpt.tensors.items():
        if key in companions:
            continue
        values = math.prod(value_shape(quant[key].kind, info.shape)) if key in quant else 0
        out_bytes += values * itemsize if key in quant else info.nbytes
    growth = out_bytes / max(ckpt.total_bytes, 1)
    largest_out = int(max(shard_sizes, default=0) * growth)
    return {
        "source": ckpt.source.description,
        "format": "native" if native else "hf",
        "adapter": chosen.name,
        "detection": chosen.describe()["detection"],
        "layout": chosen.layout(list(ckpt.tensors)),
        "architectures": ckpt.config.get("architectures"),
        "quantization": {
            "quantized_tensors": len(quant),
            "schemes": kinds,
            "block_size": [128, 128]
            if ScaleKind.BLOCK.value in kinds
            else [1, 32]
            if ScaleKind.MXFP8.value in kinds
            else None,
            "activation_scheme": activation,
            **describe(config, source_keys),
            "output_formats": _output_formats(
                kept, [k for k in hf_keys if chosen.quantizable(k)], chosen, fmt
            ),
        },
        "shards": len(ckpt.shards),
        "tensors": len(ckpt.tensors),
        "bytes": ckpt.total_bytes,
        "largest_shard_bytes": max(shard_sizes, default=0),
        "carried_files": ckpt.extra_files,
        "conversion": {
            "to": "hf" if native else "native",
            "dtype": dtype,
            "output_bytes": out_bytes if not native else None,
            "disk_bytes_needed": out_bytes if not native else ckpt.total_bytes,
            "peak_host_memory_bytes": 3 * largest_out + 2 * STEP_BYTES["cpu"] * 4,
        },
    }


def _output_formats(
    kept: dict[str, Quant], quantizable: list[str], adapter: Adapter, source: QuantFormat
) -> dict[str, dict[str, Any]]:
    """Per output format (those ``--format`` offers, and the source's own: MXFP4 is only ever that):
    whether ``--quantize keep`` can write the recorded scales in it (the quantized bytes then stay as
    they are), and the fresh ``--quantize`` schemes it can take — both only where the result is a layout
    transformers reads correctly (``QuantFormat.unreadable``), the source's own layout excepted."""

    def readable(fmt: QuantFormat, key: str, kind: ScaleKind) -> bool:
        return not fmt.unreadable(key, kind, adapter.claims_expert(key))

    return {
        name: {
            "keep": all(
                q.kind in fmt.kinds and (fmt is source or readable(fmt, k, q.kind)) for k, q in kept.items()
            ),
            "quantize": [
                mode
                for mode, kind in FRESH.items()
                if fmt.fresh and kind in fmt.kinds and all(readable(fmt, k, kind) for k in quantizable)
            ],
        }
        for name, fmt in FORMATS.items()
        if name in FORMAT_NAMES or fmt is source
    }
