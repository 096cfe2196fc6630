"""How each hf tensor is written: cast, re-quantized with recorded scales, or quantized fresh."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .adapters import Adapter
from .errors import RecastError
from .fp8 import (
    ScaleKind,
    encode,
    expand_scale,
    fresh_scale,
    quantize,
    scale_from_amax,
    scale_shape,
    stored_shape,
)
from .keymap import Quant
from .qformat import FP8_FORMAT, QuantFormat, Scheme
from .safetensors_io import DTYPE_NAMES, DTYPES

QUANTIZE_MODES = ("keep", "none", "per-tensor", "per-channel", "block")
# Fresh scales per mode; a per-channel or block scale is computed from the rows it covers alone.
FRESH = {"per-tensor": ScaleKind.PER_TENSOR, "per-channel": ScaleKind.PER_CHANNEL, "block": ScaleKind.BLOCK}


@dataclass(frozen=True)
class Encoding:
    """What hf tensor ``key`` becomes on disk, in format ``fmt``.

    ``mode`` None writes ``dtype`` as is; ``keep`` re-quantizes with the recorded scale ``keep``;
    ``per-tensor``/``per-channel``/``block`` compute fresh scales. ``activation`` (a source key) is
    carried verbatim when static, written as ``activation_out``; so is ``zero_point`` (same format only).
    """

    key: str
    dtype: str
    mode: str | None = None
    keep: Quant | None = None
    activation: str | None = None
    fmt: QuantFormat = FP8_FORMAT
    activation_out: str | None = None
    zero_point: str | None = None
    renamed: bool = False  # keep across formats: the scale is re-spelled (and a per-tensor one re-shaped)

    @property
    def scale_key(self) -> str:
        """The scale's name: a kept one's own in its own format (MiMo-V2.6's uint8 FP4 experts spell theirs
        apart from the format's other scales), else the format's."""
        return self.keep.scale if self.mode == "keep" and not self.renamed else self.fmt.scale_key(self.key)

    @property
    def scale_kind(self) -> ScaleKind | None:
        if self.mode == "keep":
            return self.keep.kind
        return FRESH.get(self.mode or "")


def choose(
    key: str,
    shape: tuple[int, ...],
    value_dtype: str,
    quantize_mode: str,
    recorded: dict[str, Quant],
    source_dtypes: dict[str, str],
    adapter: Adapter,
    fmt: QuantFormat = FP8_FORMAT,
    source_fmt: QuantFormat = FP8_FORMAT,
) -> Encoding:
    """Decide one hf tensor's encoding from the requested mode and format and what the source had.

    A layout Recast makes up (fresh scales, or kept scales re-spelled in another format) must be one
    transformers reads correctly (``QuantFormat.check_readable``); the source's own layout is kept as is.
    Fresh scales go on matrices only (``shape`` of 2 or more dims): a 1-D ``*.weight`` is a norm's, whatever
    its name (Nemotron-H's ``norm_f``), and stays high precision.
    """
    original = source_dtypes.get(key, value_dtype)
    q = recorded.get(key)
    # a quantized source (FP8 codes, DeepSeek-V4's int8 FP4 codes) goes out unquantized in the value dtype
    plain = value_dtype if q is not None or original.startswith("F8") else original
    same = fmt is source_fmt
    act = q.activation if q else None
    act_out = act if same else (fmt.activation_keys(key)[0] if act else None)
    if quantize_mode == "keep" and q is not None:
        fmt.check_kind(key, q.kind)
        if not same:
            fmt.check_readable(key, q.kind, adapter.claims_expert(key))
        return Encoding(
            key, q.kind.stored_dtype, "keep", q, act, fmt, act_out, q.zero_point if same else None, not same
        )
    if q is not None and q.kind.restore_only:
        raise RecastError(
            f"{key!r} is {q.kind.value} in the source; Recast writes {q.kind.value} only to restore the "
            f"source's own values (--quantize keep), not with --quantize {quantize_mode}"
        )
    if quantize_mode in FRESH and adapter.quantizable(key) and len(shape) >= 2:
        fmt.check_fresh(key, quantize_mode)
        fmt.check_kind(key, FRESH[quantize_mode])
        fmt.check_readable(key, FRESH[quantize_mode], adapter.claims_expert(key))
        return Encoding(key, "F8_E4M3", quantize_mode, None, act, fmt, act_out)
    return Encoding(key, plain)


class Encoder:
    """Stateful per-tensor encoder: fed rows in order, returns what to write at which row."""

    def __init__(self, enc: Encoding, shape: tuple[int, ...], scales, amax: torch.Tensor | None = None):
        self.enc, self.shape, self._scales = enc, shape, scales
        self.kind = enc.scale_kind
        self._scale: torch.Tensor | None = None
        if enc.mode == "keep":
            self._scale = scales(enc.keep.scale)
            if enc.renamed and self._scale.dtype == torch.float8_e8m0fnu and not enc.keep.kind.exact_only:
                # DeepSeek-V4's power-of-two block scales, spelled as the fp32 multipliers another format
                # reads (exactly: a power of two is an fp32 value)
                self._scale = self._scale.float()
            if enc.renamed and enc.keep.kind is ScaleKind.PER_TENSOR:
                self._scale = self._scale.reshape(enc.fmt.tensor_scale_shape)
        elif enc.mode == "per-tensor" and amax is not None:
            self._scale = scale_from_amax(amax).reshape(enc.fmt.tensor_scale_shape)

    @property
    def needs_amax(self) -> bool:
        """Per-tensor fresh scales need the whole tensor's amax before the first row is encoded."""
        return self.enc.mode == "per-tensor" and self._scale is None

    def set_amax(self, amax: torch.Tensor) -> None:
        self._scale = scale_from_amax(amax).reshape(self.enc.fmt.tensor_scale_shape)

    def rows(self, x: torch.Tensor, r0: int) -> list[tuple[str, int, torch.Tensor]]:
        """Encode rows ``r0…`` of the value; returns (key, row, tensor) pieces to write."""
        enc = self.enc
        if enc.mode is None:
            return [(enc.key, r0, x.to(_torch(enc.dtype)))]
        rows = slice(r0, r0 + (x.shape[0] if x.dim() else 1))
        if enc.mode in ("block", "per-channel"):
            s = fresh_scale(self.kind, x)
            q = quantize(x, expand_scale(self.kind, s, slice(0, rows.stop - r0), tuple(x.shape)))
            srow = r0 // 128 if len(self.shape) == 2 and enc.mode == "block" else r0
            return [(enc.key, r0, q), (enc.scale_key, srow, s)]
        scale = self._scale.to(x.device)
        return [(enc.key, r0, encode(x, self.kind, scale, rows, self.shape))]

    def finish(self) -> list[tuple[str, int, torch.Tensor]]:
        """Tensors written once per hf tensor: the kept or per-tensor scale and the activation scale."""
        out = []
        if self.enc.mode in ("keep", "per-tensor"):
            out.append((self.enc.scale_key, 0, self._scale))
        for src, dst in self._carried():
            out.append((dst, 0, self._scales(src)))
        return out

    def _carried(self) -> list[tuple[str, str]]:
        """(source key, output key) of the companions carried verbatim."""
        enc = self.enc
        pairs = [(enc.activation, enc.activation_out), (enc.zero_point, enc.zero_point)]
        return [(a, b) for a, b in pairs if a and b]

    def planned(self, scales_info) -> list[tuple[str, str, tuple[int, ...]]]:
        """(key, dtype, shape) of everything this tensor writes, for the shard layout."""
        enc = self.enc
        out = [(enc.key, enc.dtype, stored_shape(self.kind, self.shape))]
        if enc.mode == "keep":
            info = scales_info(enc.keep.scale)
            shape = tuple(self._scale.shape) if enc.renamed else info.shape
            out.append((enc.scale_key, DTYPE_NAMES[self._scale.dtype] if enc.renamed else info.dtype, shape))
        elif enc.mode in FRESH:
            shape = enc.fmt.tensor_scale_shape if self.kind is ScaleKind.PER_TENSOR else None
            out.append(
                (enc.scale_key, "F32", shape if shape is not None else scale_shape(self.kind, self.shape))
            )
        for src, dst in self._carried():
            info = scales_info(src)
            out.append((dst, info.dtype, info.shape))
        return out


def _torch(name: str) -> torch.dtype:
    return DTYPES[name]


def quantization_config(
    encodings: list[Encoding], adapter: Adapter, fmt: QuantFormat
) -> dict[str, Any] | None:
    """The config.json entry for freshly quantized output (DESIGN §4), in ``fmt``'s spelling."""
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
    kinds = frozenset(e.scale_kind for e in quantized)
    return fmt.write_config(Scheme(kinds, static, sorted(skipped)))
