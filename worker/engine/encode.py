"""How each hf tensor is written: cast, re-quantized with recorded scales, or quantized fresh."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .adapters import Adapter
from .fp8 import ScaleKind, expand_scale, fresh_scale, quantize, scale_from_amax, scale_shape
from .keymap import Quant
from .safetensors_io import DTYPES

QUANTIZE_MODES = ("keep", "none", "per-tensor", "block")


@dataclass(frozen=True)
class Encoding:
    """What hf tensor ``key`` becomes on disk.

    ``mode`` None writes ``dtype`` as is; ``keep`` re-quantizes with the recorded scale ``keep``;
    ``per-tensor``/``block`` compute fresh scales. ``activation`` is carried verbatim when static.
    """

    key: str
    dtype: str
    mode: str | None = None
    keep: Quant | None = None
    activation: str | None = None

    @property
    def scale_key(self) -> str:
        return self.key + "_scale_inv"

    @property
    def scale_kind(self) -> ScaleKind | None:
        if self.mode == "keep":
            return self.keep.kind
        return {"per-tensor": ScaleKind.PER_TENSOR, "block": ScaleKind.BLOCK}.get(self.mode or "")


def choose(
    key: str,
    value_dtype: str,
    quantize_mode: str,
    recorded: dict[str, Quant],
    source_dtypes: dict[str, str],
    adapter: Adapter,
) -> Encoding:
    """Decide one hf tensor's encoding from the requested mode and what the source had."""
    original = source_dtypes.get(key, value_dtype)
    plain = value_dtype if original.startswith("F8") else original
    q = recorded.get(key)
    if quantize_mode == "keep" and q is not None:
        return Encoding(key, "F8_E4M3", "keep", q, q.activation)
    if quantize_mode in ("per-tensor", "block") and adapter.quantizable(key):
        return Encoding(key, "F8_E4M3", quantize_mode, None, q.activation if q else None)
    return Encoding(key, plain)


class Encoder:
    """Stateful per-tensor encoder: fed rows in order, returns what to write at which row."""

    def __init__(self, enc: Encoding, shape: tuple[int, ...], scales, amax: torch.Tensor | None = None):
        self.enc, self.shape, self._scales = enc, shape, scales
        self.kind = enc.scale_kind
        self._scale: torch.Tensor | None = None
        if enc.mode == "keep":
            self._scale = scales(enc.keep.scale)
        elif enc.mode == "per-tensor" and amax is not None:
            self._scale = scale_from_amax(amax).reshape(())

    @property
    def needs_amax(self) -> bool:
        """Per-tensor fresh scales need the whole tensor's amax before the first row is encoded."""
        return self.enc.mode == "per-tensor" and self._scale is None

    def set_amax(self, amax: torch.Tensor) -> None:
        self._scale = scale_from_amax(amax).reshape(())

    def rows(self, x: torch.Tensor, r0: int) -> list[tuple[str, int, torch.Tensor]]:
        """Encode rows ``r0…`` of the value; returns (key, row, tensor) pieces to write."""
        enc = self.enc
        if enc.mode is None:
            return [(enc.key, r0, x.to(_torch(enc.dtype)))]
        rows = slice(r0, r0 + (x.shape[0] if x.dim() else 1))
        if enc.mode == "block":
            s = fresh_scale(ScaleKind.BLOCK, x)
            q = quantize(x, expand_scale(ScaleKind.BLOCK, s, slice(0, rows.stop - r0), tuple(x.shape)))
            srow = r0 // 128 if len(self.shape) == 2 else r0
            return [(enc.key, r0, q), (enc.scale_key, srow, s)]
        scale = self._scale.to(x.device)
        return [(enc.key, r0, quantize(x, expand_scale(self.kind, scale, rows, self.shape)))]

    def finish(self) -> list[tuple[str, int, torch.Tensor]]:
        """Tensors written once per hf tensor: the kept or per-tensor scale and the activation scale."""
        out = []
        if self.enc.mode in ("keep", "per-tensor"):
            out.append((self.enc.scale_key, 0, self._scale))
        if self.enc.activation:
            out.append((self.enc.activation, 0, self._scales(self.enc.activation)))
        return out

    def planned(self, scales_info) -> list[tuple[str, str, tuple[int, ...]]]:
        """(key, dtype, shape) of everything this tensor writes, for the shard layout."""
        enc = self.enc
        out = [(enc.key, enc.dtype, self.shape)]
        if enc.mode == "keep":
            info = scales_info(enc.keep.scale)
            out.append((enc.scale_key, info.dtype, info.shape))
        elif enc.mode in ("per-tensor", "block"):
            out.append((enc.scale_key, "F32", scale_shape(self.kind, self.shape)))
        if enc.activation:
            info = scales_info(enc.activation)
            out.append((enc.activation, info.dtype, info.shape))
        return out


def _torch(name: str) -> torch.dtype:
    return DTYPES[name]


def quantization_config(encodings: list[Encoding], adapter: Adapter, mode: str) -> dict[str, Any] | None:
    """The config.json entry for freshly quantized output (DESIGN §4)."""
    quantized = [e for e in encodings if e.mode]
    if not quantized:
        return None
    static = all(e.activation for e in quantized)
    skipped = set()
    for e in encodings:
        if e.mode or not e.key.endswith(".weight"):
            continue
        prefix = next((p for p in adapter.not_quantized_prefixes if p in e.key), None)
        skipped.add(e.key[: e.key.index(prefix) + len(prefix) - 1] if prefix else e.key[: -len(".weight")])
    return {
        "quant_method": "fp8",
        "activation_scheme": "static" if static else "dynamic",
        "weight_block_size": [128, 128] if mode == "block" else None,
        "modules_to_not_convert": sorted(skipped),
    }
