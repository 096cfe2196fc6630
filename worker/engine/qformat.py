"""How an hf checkpoint spells its quantized weights: one row of data per format, one code for all.

The FP8 formats store ``float8_e4m3fn`` weights beside a dequantization multiplier (``w = q * s``); they
differ only in names, in the shape of a per-tensor scale and in their ``quantization_config``:

- ``fp8`` (the vendors' layout, transformers' ``quant_method: fp8``): ``K_scale_inv``, activation scales
  ``X.activation_scale`` / ``K_activation_scale``. Its MXFP8 variant (``weight_block_size [1, 32]``,
  ``scale_fmt: ue8m0``: MiniMax-M3) has uint8 exponents for ``K_scale_inv``; like MXFP4 it is only ever
  the source's own, restored by ``--quantize keep``.
- ``compressed-tensors`` (llm-compressor, vLLM): ``K_scale``, ``X.input_scale`` / ``K_input_scale``, an
  optional all-zero ``K_zero_point``; ``config_groups`` of ``weights`` / ``input_activations`` schemes
  and an ``ignore`` list. Its config is read and written here, by hand: the ``compressed-tensors``
  package imports transformers (27 s, and a dependency the engine does not otherwise have), so the
  engine does not import it; the tests validate what this writes with the package's own schema.
- ``modelopt`` (NVIDIA TensorRT Model Optimizer's FP8 export: Nemotron 3's FP8 releases): compressed-tensors'
  names (``X.weight_scale``, ``X.input_scale``, 0-d) with ``quant_method: modelopt, quant_algo: FP8``. Read, and
  written only by ``--quantize keep`` in its own format (its consumers, vLLM and TensorRT-LLM, are not
  test dependencies, so Recast does not make ModelOpt layouts up); KV-cache scales (``k_scale`` /
  ``v_scale``) are plain tensors that pass through.
- ``fp8-v4`` (DeepSeek-V4): transformers' ``fp8`` spelled ``K.scale`` beside ``K.weight``, e8m0 exponents
  (``F8_E8M0``) as 128x128 block scales of the e4m3 weights, and the routed experts in FP4 (int8 codes,
  two per byte, one exponent per 32 columns: ``ScaleKind.FP4``). It shares ``quant_method: fp8`` with the
  vendors' row, so the keys decide between them (``source_format``). Read, and written only by
  ``--quantize keep`` to restore the source's own layout.
- ``compressed-tensors-mxfp4`` (compressed-tensors' ``mxfp4-pack-quantized``: Kimi K3's routed experts):
  ``K.weight_packed`` (uint8, two e2m1 codes a byte, low nibble first) beside ``K.weight_scale`` (uint8 e8m0
  exponents, one per 32 values of a row), the flat FP4 numbers of ``ScaleKind.FP4_U8``. It shares
  ``quant_method: compressed-tensors`` with the FP8 row; config.json's ``format`` decides between them.
  Read, and written only by ``--quantize keep`` to restore the source's own layout.
- ``mxfp4`` (gpt-oss, transformers' ``quant_method: mxfp4``): not FP8 but the same pairing, ``K_blocks``
  (packed e2m1 codes) beside ``K_scales`` (e8m0 exponents), so it is one more row. It is read, and
  written only by ``--quantize keep`` in its own format: ``ScaleKind.MXFP4`` is in no other format's
  kinds, and ``--format`` does not offer it.

A layout Recast makes up (fresh scales, or kept scales re-spelled in the other format) must also be one
its consumers read back correctly, or Recast refuses it (``check_readable``); the facts it rests on are
transformers 5.x's own loaders, checked by tests/test_consumers.py. A layout kept in the source's own
format is the source's, restored byte for byte, and is never refused.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from . import mxfp4
from .errors import CheckpointError, RecastError
from .fp8 import BLOCK, E8M0_DTYPES, ScaleKind, classify_e8m0_scale, classify_scale, scale_shape
from .safetensors_io import TensorInfo

# The formats a user may choose with --format; mxfp4 is only ever the source's own.
FORMAT_NAMES = ("fp8", "compressed-tensors")
# config.json fields (top level or text_config) that describe how the weights are stored, so an output
# keeps them only when it keeps the source's own layout: DeepSeek-V4 declares its FP4 experts beside
# quantization_config, as expert_dtype.
QUANTIZATION_FIELDS = ("quantization_config", "expert_dtype")


def _fp8_classify(key: str, weight: TensorInfo, scale: TensorInfo) -> ScaleKind:
    """A float multiplier (per tensor, expert, channel or 128x128 block), or e8m0 exponents (MXFP8, or
    power-of-two blocks, or those of uint8 FP4 codes: MiMo-V2.6's experts)."""
    if weight.dtype == "U8":
        mxfp4.check_flat(key, (weight.dtype, weight.shape), (scale.dtype, scale.shape), codes="U8")
        return ScaleKind.FP4_U8
    if scale.dtype in E8M0_DTYPES:
        return classify_e8m0_scale(key, weight.shape, (scale.dtype, scale.shape))
    return classify_scale(key, weight.shape, scale.shape)


_V4_KINDS = frozenset(
    {ScaleKind.PER_TENSOR, ScaleKind.BLOCK, ScaleKind.FP4, ScaleKind.BLOCK32, ScaleKind.MXFP8}
)


def _v4_classify(key: str, weight: TensorInfo, scale: TensorInfo) -> ScaleKind:
    """DeepSeek-V4 and V4.1: int8 FP4 codes with per-32 exponents, or e4m3 with power-of-two scales per
    128x128 block (V4), per 32x32 block (V4.1), or per 32 columns of a row (V4.1's Engram tables)."""
    if weight.dtype == "I8":
        mxfp4.check_flat(key, (weight.dtype, weight.shape), (scale.dtype, scale.shape))
        return ScaleKind.FP4
    blocks32 = scale_shape(ScaleKind.BLOCK32, weight.shape) if len(weight.shape) == 2 else None
    if (
        scale.dtype in E8M0_DTYPES
        and tuple(scale.shape) == blocks32
        and blocks32 != scale_shape(ScaleKind.BLOCK, weight.shape)
    ):
        return ScaleKind.BLOCK32
    kind = _fp8_classify(key, weight, scale)
    if kind not in _V4_KINDS:
        raise CheckpointError(
            f"scale of {key!r} is {kind.value} ({scale.dtype} {list(scale.shape)}); DeepSeek-V4's e4m3 weights "
            f"have one scale per {BLOCK}x{BLOCK} block: {list(scale_shape(ScaleKind.BLOCK, weight.shape))}, "
            f"V4.1's per 32x32 block: {list(scale_shape(ScaleKind.BLOCK32, weight.shape))}"
        )
    return kind


def _packed_fp4_classify(key: str, weight: TensorInfo, scale: TensorInfo) -> ScaleKind:
    mxfp4.check_flat(key, (weight.dtype, weight.shape), (scale.dtype, scale.shape), codes="U8")
    return ScaleKind.FP4_U8


def _mxfp4_classify(key: str, weight: TensorInfo, scale: TensorInfo) -> ScaleKind:
    mxfp4.check(key, (weight.dtype, weight.shape), (scale.dtype, scale.shape))
    return ScaleKind.MXFP4


@dataclass(frozen=True)
class Scheme:
    """What a quantized output holds, for its config: the scale kinds, static activations, skipped modules."""

    kinds: frozenset[ScaleKind]
    static: bool
    skipped: list[str]


@dataclass(frozen=True)
class QuantFormat:
    name: str
    quant_method: str
    scale_suffix: str  # K + scale_suffix is K's dequantization multiplier
    activation: str  # X.<activation> beside X.weight, K_<activation> beside an expert tensor K
    zero_point_suffix: str | None
    tensor_scale_shape: tuple[int, ...]  # how a freshly written per-tensor scale is stored
    kinds: frozenset[ScaleKind]  # the scale kinds its consumers read
    expert_blocks: bool  # whether its consumers read 128x128 block scales on per-expert weights
    write_config: Callable[[Scheme], dict[str, Any]]
    read_config: Callable[[dict[str, Any]], list[dict[str, Any]]]
    # K + weight_suffix is the quantized tensor whose scale is K + scale_suffix (mxfp4's K_blocks, K_scales)
    weight_suffix: str = ""
    # The dtype of a tensor named K + weight_suffix that is quantized codes, so must have a scale; None: any
    # (DeepSeek-V4 names its bf16 norms K.weight too, its FP4 codes are I8).
    codes_dtype: str | None = None
    # The scale kind of a quantized tensor and its scale, from their headers; errors name the key.
    classify: Callable[[str, TensorInfo, TensorInfo], ScaleKind] = _fp8_classify
    # Whether Recast writes fresh scales in it; False: only a source's own, restored (MXFP4, ModelOpt).
    fresh: bool = True
    # K + this is the scale of uint8 FP4 codes K where the format's other scales are K + scale_suffix
    # (MiMo-V2.6's experts K.weight_scale beside its FP8 weights' K.weight_scale_inv).
    codes_scale_suffix: str = ""
    # The config.json ``quantization_config.format`` values this row reads, where rows share a
    # ``quant_method`` (compressed-tensors' FP8 and MXFP4); None stands for a config without one. Empty: any.
    config_formats: tuple[str | None, ...] = ()

    def scale_key(self, key: str) -> str:
        if self.weight_suffix and key.endswith(self.weight_suffix):
            key = key[: -len(self.weight_suffix)]
        return key + self.scale_suffix

    def weight_key(self, scale_key: str) -> str:
        """The quantized tensor a scale named ``scale_key`` belongs to."""
        return scale_key[: -len(self.scale_suffix)] + self.weight_suffix

    def unpacked_name(self, key: str) -> str | None:
        """The name of the weight that codes stored under a name of their own hold (Kimi K3's
        ``K.weight_packed`` → ``K.weight``), where ``key`` is so named: the name it goes out under when its
        codes are not kept."""
        if self.weight_suffix and key.endswith(".weight" + self.weight_suffix):
            return key[: -len(self.weight_suffix)]
        return None

    def packed(self, key: str, dtype: str) -> bool:
        """Whether ``key`` (of ``dtype``) is named as quantized codes, which must then have a scale."""
        named = bool(self.weight_suffix) and key.endswith(self.weight_suffix)
        return named and self.codes_dtype in (None, dtype)

    def activation_keys(self, key: str) -> list[str]:
        """Where ``key``'s activation scale may be, the name this format writes first."""
        if not self.activation:
            return []
        found = [f"{key}_{self.activation}"]
        if key.endswith(".weight"):
            found.insert(0, f"{key[: -len('.weight')]}.{self.activation}")
        return found

    def zero_point_key(self, key: str) -> str | None:
        return key + self.zero_point_suffix if self.zero_point_suffix else None

    def companion_name(self, key: str) -> bool:
        """Activation scales and zero points: tensors that belong to a weight without a scale suffix."""
        activation = bool(self.activation) and key.endswith(self.activation)
        return activation or bool(self.zero_point_suffix and key.endswith(self.zero_point_suffix))

    def check_fresh(self, key: str, mode: str) -> None:
        if not self.fresh:
            raise RecastError(
                f"{key!r} would get fresh {mode} scales in the {self.name} format, which Recast writes only to "
                f"restore a source's own scales (--quantize keep); choose --format {' or '.join(FORMAT_NAMES)}"
            )

    def check_kind(self, key: str, kind: ScaleKind) -> None:
        if kind not in self.kinds:
            others = [
                f.name
                for f in FORMATS.values()
                if kind in f.kinds and f.name in FORMAT_NAMES and f.unreadable(key, kind, False) is None
            ]
            instead = (
                f"choose --format {' or '.join(others)}, or another --quantize scheme"
                if others
                else f"{kind.value} is written only in its own format: leave --format unset"
            )
            raise RecastError(
                f"{key!r} would be written with {kind.value} scales, which the {self.name} format has no "
                f"scheme for (it has {', '.join(sorted(k.value for k in self.kinds))}); {instead}"
            )

    def unreadable(self, key: str, kind: ScaleKind, expert: bool) -> str | None:
        """Why transformers would load ``key`` written with ``kind`` scales silently wrong, or not at all.

        Both of transformers' FP8 loaders (``fp8`` and ``compressed-tensors``) dequantize only tensors
        named ``*.weight``: a 3-D expert tensor such as Mistral 4's ``mlp.experts.gate_up_proj`` loads as
        its raw FP8 codes, its scale ignored. Its compressed-tensors loader multiplies each expert weight
        by its scale as is, which cannot broadcast a 128x128 block grid.
        """
        if not key.endswith(".weight"):
            return (
                f"{key!r} would be written as FP8 ({kind.value} scales, {self.name} format), but "
                "transformers dequantizes only FP8 tensors named '*.weight': it would load this tensor's "
                "raw FP8 codes with its scale ignored, silently wrong. Choose --quantize none (bf16), or "
                "--quantize keep from a native checkpoint of an FP8 release in that release's own format "
                "(its own layout, restored byte for byte)"
            )
        if expert and kind is ScaleKind.BLOCK and not self.expert_blocks:
            return (
                f"{key!r} is an expert weight: {self.name} block scales on expert weights do not load in "
                "transformers (its loader multiplies each expert weight by its [rows/128, cols/128] scale "
                "without expanding the blocks, and fails). Choose --format fp8 for 128x128 blocks, or "
                "--quantize per-channel or per-tensor for compressed-tensors"
            )
        return None

    def check_readable(self, key: str, kind: ScaleKind, expert: bool) -> None:
        why = self.unreadable(key, kind, expert)
        if why:
            raise RecastError(why)


def _fp8_config(s: Scheme) -> dict[str, Any]:
    return {
        "quant_method": "fp8",
        "activation_scheme": "static" if s.static else "dynamic",
        "weight_block_size": [BLOCK, BLOCK] if s.kinds & {ScaleKind.BLOCK, ScaleKind.SHARDED} else None,
        "modules_to_not_convert": s.skipped,
    }


def _fp8_read(qc: dict[str, Any]) -> list[dict[str, Any]]:
    block = qc.get("weight_block_size")
    return [
        {
            "group": "all",
            "targets": ["Linear"],
            "weights": "mxfp8" if list(block or []) == [1, 32] else "block" if block else "tensor",
            "block_structure": block,
            "input_activations": qc.get("activation_scheme", "dynamic"),
        }
    ]


_CT_STRATEGY = {ScaleKind.PER_TENSOR: "tensor", ScaleKind.PER_CHANNEL: "channel", ScaleKind.BLOCK: "block"}


def _ct_args(strategy: str, dynamic: bool, block: list[int] | None = None, group: int | None = None):
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "strategy": strategy,
        "dynamic": dynamic,
        "group_size": group,
        "block_structure": block,
        "actorder": None,
        "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
    }


def _ct_config(s: Scheme) -> dict[str, Any]:
    """One config group per weight strategy (llm-compressor's FP8, FP8_DYNAMIC and FP8_BLOCK schemes)."""
    groups = {}
    for i, kind in enumerate(sorted(s.kinds, key=list(_CT_STRATEGY).index)):
        block = kind is ScaleKind.BLOCK
        if s.static:
            act = _ct_args("tensor", False)
        else:
            act = _ct_args("group" if block else "token", True, group=BLOCK if block else None)
        groups[f"group_{i}"] = {
            "targets": ["Linear"],
            "weights": _ct_args(_CT_STRATEGY[kind], False, [BLOCK, BLOCK] if block else None),
            "input_activations": act,
            "output_activations": None,
            "format": "float-quantized",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": s.skipped,
        "kv_cache_scheme": None,
    }


def _ct_read(qc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each config group's FP8 scheme; anything Recast cannot convert exactly is refused here."""
    if qc.get("format", "float-quantized") not in ("float-quantized", "naive-quantized"):
        raise CheckpointError(
            f"compressed-tensors format {qc.get('format')!r} is not supported (float-quantized, "
            "naive-quantized and mxfp4-pack-quantized are)"
        )
    if qc.get("kv_cache_scheme"):
        raise CheckpointError("compressed-tensors kv_cache_scheme (k_scale / v_scale) is not supported")
    out = []
    for name, group in (qc.get("config_groups") or {}).items():
        w, act = group.get("weights") or {}, group.get("input_activations")
        if (w.get("num_bits"), w.get("type")) != (8, "float") or not w.get("symmetric", True):
            raise CheckpointError(
                f"compressed-tensors group {name!r}: weights are {w.get('num_bits')}-bit {w.get('type')}"
                f"{'' if w.get('symmetric', True) else ' asymmetric'}; only symmetric FP8 (8-bit float) is read"
            )
        if w.get("strategy") not in ("tensor", "channel", "block"):
            raise CheckpointError(
                f"compressed-tensors group {name!r}: weight strategy {w.get('strategy')!r} is not supported "
                "(tensor, channel or block)"
            )
        block = w.get("block_structure")
        if w.get("strategy") == "block" and list(block or []) != [BLOCK, BLOCK]:
            raise CheckpointError(
                f"compressed-tensors group {name!r}: block_structure {block} is not supported ([128, 128])"
            )
        out.append(
            {
                "group": name,
                "targets": group.get("targets", []),
                "weights": w["strategy"],
                "block_structure": block,
                "input_activations": None if act is None else ("dynamic" if act.get("dynamic") else "static"),
            }
        )
    return out


def _ct_mxfp4_args() -> dict[str, Any]:
    """compressed-tensors' MXFP4 weights (its MXFP4A16 preset): e2m1 in groups of 32, e8m0 (uint8) scales."""
    return {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "strategy": "group",
        "group_size": mxfp4.BLOCK,
        "dynamic": False,
        "scale_dtype": "torch.uint8",
        "zp_dtype": "torch.uint8",
    }


def _ct_mxfp4_config(s: Scheme) -> dict[str, Any]:
    return {
        "quant_method": "compressed-tensors",
        "format": "mxfp4-pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": _ct_mxfp4_args(), "format": "mxfp4-pack-quantized"}
        },
        "ignore": s.skipped,
        "kv_cache_scheme": None,
    }


def _ct_mxfp4_read(qc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each config group's MXFP4 weights; any other scheme is refused here, naming the group."""
    if qc.get("kv_cache_scheme"):
        raise CheckpointError("compressed-tensors kv_cache_scheme (k_scale / v_scale) is not supported")
    out = []
    for name, group in (qc.get("config_groups") or {}).items():
        w, act = group.get("weights") or {}, group.get("input_activations")
        got = (
            w.get("num_bits"),
            w.get("type"),
            w.get("strategy"),
            w.get("group_size"),
            w.get("symmetric", True),
        )
        if got != (4, "float", "group", mxfp4.BLOCK, True):
            raise CheckpointError(
                f"compressed-tensors group {name!r} (mxfp4-pack-quantized): weights are {got[0]}-bit {got[1]} "
                f"{got[2]} of {got[3]}{'' if got[4] else ' asymmetric'}; MXFP4 is symmetric 4-bit float in "
                f"groups of {mxfp4.BLOCK}"
            )
        if act is not None and not act.get("dynamic"):
            raise CheckpointError(
                f"compressed-tensors group {name!r}: static input activation scales are not supported with MXFP4"
            )
        out.append(
            {
                "group": name,
                "targets": group.get("targets", []),
                "weights": "mxfp4",
                "block_structure": [1, mxfp4.BLOCK],
                "input_activations": None if act is None else "dynamic",
            }
        )
    return out


def _modelopt_config(s: Scheme) -> dict[str, Any]:
    return {
        "quant_method": "modelopt",
        "quant_algo": "FP8",
        "kv_cache_quant_algo": None,
        "exclude_modules": s.skipped,
    }


def _modelopt_read(qc: dict[str, Any]) -> list[dict[str, Any]]:
    """ModelOpt's FP8 (per-tensor weights, static activations); its other algorithms are refused. The
    algorithm sits at the top of config.json's entry, or under ``quantization`` as hf_quant_config.json
    nests it."""
    algo = qc.get("quant_algo") or (qc.get("quantization") or {}).get("quant_algo")
    if algo != "FP8":
        raise CheckpointError(
            f"config.json quantization_config.quant_algo {algo!r} (ModelOpt) is not supported; "
            "ModelOpt's FP8 (per-tensor) is"
        )
    return [
        {
            "group": "all",
            "targets": ["Linear"],
            "weights": "tensor",
            "block_structure": None,
            "input_activations": "static",
        }
    ]


def _mxfp4_config(s: Scheme) -> dict[str, Any]:
    return {"quant_method": "mxfp4", "modules_to_not_convert": s.skipped}


def _mxfp4_read(qc: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "group": "all",
            "targets": ["experts"],
            "weights": "mxfp4",
            "block_structure": [1, mxfp4.BLOCK],
            "input_activations": None,
        }
    ]


FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat(
            "fp8",
            "fp8",
            "_scale_inv",
            "activation_scale",
            None,
            (),
            frozenset(
                {
                    ScaleKind.PER_TENSOR,
                    ScaleKind.PER_EXPERT,
                    ScaleKind.BLOCK,
                    ScaleKind.MXFP8,
                    ScaleKind.SHARDED,
                    ScaleKind.FP4_U8,
                }
            ),
            True,
            _fp8_config,
            _fp8_read,
            codes_scale_suffix="_scale",
        ),
        QuantFormat(
            "compressed-tensors",
            "compressed-tensors",
            "_scale",
            "input_scale",
            "_zero_point",
            (1,),
            frozenset({ScaleKind.PER_TENSOR, ScaleKind.PER_CHANNEL, ScaleKind.BLOCK}),
            False,
            _ct_config,
            _ct_read,
            config_formats=(None, "float-quantized", "naive-quantized"),
        ),
        QuantFormat(
            "compressed-tensors-mxfp4",
            "compressed-tensors",
            "_scale",
            "",
            None,
            (),
            frozenset({ScaleKind.FP4_U8}),
            False,
            _ct_mxfp4_config,
            _ct_mxfp4_read,
            weight_suffix="_packed",
            codes_dtype="U8",
            classify=_packed_fp4_classify,
            fresh=False,
            config_formats=("mxfp4-pack-quantized",),
        ),
        QuantFormat(
            "modelopt",
            "modelopt",
            "_scale",
            "input_scale",
            None,
            (),
            frozenset({ScaleKind.PER_TENSOR}),
            False,
            _modelopt_config,
            _modelopt_read,
            fresh=False,
        ),
        QuantFormat(
            "fp8-v4",
            "fp8",
            ".scale",
            "",
            None,
            (),
            _V4_KINDS,  # a one-block matrix's [1, 1] scale reads as per-tensor
            True,
            _fp8_config,
            _fp8_read,
            weight_suffix=".weight",
            codes_dtype="I8",
            classify=_v4_classify,
            fresh=False,
        ),
        QuantFormat(
            "mxfp4",
            "mxfp4",
            "_scales",
            "",
            None,
            (),
            frozenset({ScaleKind.MXFP4}),
            True,
            _mxfp4_config,
            _mxfp4_read,
            weight_suffix="_blocks",
            classify=_mxfp4_classify,
            fresh=False,
        ),
    )
}
FP8_FORMAT = FORMATS["fp8"]


def quantization_config_of(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``quantization_config`` at the top level, else the one inside ``text_config``."""
    config = config or {}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return config.get("quantization_config") or text.get("quantization_config") or None


def source_format(config: dict[str, Any] | None, keys: Collection[str] = ()) -> QuantFormat:
    """The format a checkpoint's config declares (vendor fp8 where it declares none). Where rows share a
    ``quant_method``, the ones that read the config's ``format`` (compressed-tensors' FP8 and MXFP4), and
    of those (fp8, fp8-v4) the one whose scale spelling ``keys`` use: a scale beside its weight."""
    qc = quantization_config_of(config)
    method = (qc or {}).get("quant_method", "fp8")
    rows = [f for f in FORMATS.values() if f.quant_method == method]
    declared = [f for f in rows if not f.config_formats or (qc or {}).get("format") in f.config_formats]
    rows = declared or rows[:1]  # none: the first row's read_config refuses the format, saying why
    spelled = [f for f in rows if any(k.endswith(f.scale_suffix) and f.weight_key(k) in keys for k in keys)]
    fmt = (spelled or rows or [None])[0]
    if fmt is None:
        raise CheckpointError(
            f"config.json quantization_config.quant_method {method!r} is not supported "
            f"(supported: {', '.join(f.quant_method for f in FORMATS.values())})"
        )
    if qc:
        fmt.read_config(qc)  # refuses schemes Recast cannot convert exactly
    return fmt


def describe(config: dict[str, Any] | None, keys: Collection[str] = ()) -> dict[str, Any]:
    """For inspect: the source format and its scheme per config group."""
    qc = quantization_config_of(config)
    fmt = source_format(config, keys)
    return {"format": fmt.name, "groups": fmt.read_config(qc) if qc else []}
