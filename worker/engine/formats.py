"""Which side of a conversion a checkpoint is on, and the scales a native checkpoint keeps beside it."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from .checkpoint import SIDECAR_TENSORS, Checkpoint
from .safetensors_io import TensorInfo, parse_header


def is_native(ckpt: Checkpoint) -> bool:
    """Native checkpoints carry Recast's sidecar, or at least native-only expert keys."""
    if ckpt.sidecar is not None:
        return ckpt.sidecar.get("format") == "native"
    return any(k.endswith(("gate_and_up_projs", "down_projs")) for k in ckpt.tensors)


def hf_side(ckpt: Checkpoint) -> tuple[dict[str, Any] | None, Collection[str]]:
    """The config.json and tensor names of the hf side: the checkpoint's own, or for a native one its
    recorded source's (recast.json), whose quantization the way back restores."""
    if is_native(ckpt):
        source = (ckpt.sidecar or {}).get("source", {})
        return source.get("config"), source.get("dtypes", {})
    return ckpt.config, ckpt.tensors


def sidecar_tensors(ckpt: Checkpoint) -> dict[str, TensorInfo]:
    """The source's FP8 and activation scales that a native checkpoint keeps for the way back."""
    if ckpt.source.exists(SIDECAR_TENSORS):
        return parse_header(ckpt.source, SIDECAR_TENSORS).tensors
    return {}
