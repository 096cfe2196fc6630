"""Model families as data: key renamings, reversible expert operations, quantization rules.

Each adapter is a value, not code: the generic planner (plan.py) applies it in both directions.
Renames are prefix maps tried in order; the way back inverts them, unless the conversion recorded the
source's own spelling, which then wins (a stripped ``language_model.`` is not guessable).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Rename:
    """``hf`` prefix becomes ``native`` prefix; ``invert`` says whether the way back may guess it."""

    hf: str
    native: str
    invert: bool = True


@dataclass(frozen=True)
class ExpertRule:
    """One reversible expert operation, matched on renamed keys.

    kind ``transpose``: aggregated ``[E, A, B]`` ↔ ``[E, B, A]`` (Mistral 4).
    kind ``stack``: per-expert 2-D weights ``…experts.{e}.{part}.weight`` ↔ one ``[E, …]`` tensor whose
    slice ``e`` is ``cat(part.T for part in parts, -1)`` (DeepSeek-V3).
    """

    kind: str
    hf: str
    native: str
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Adapter:
    name: str
    description: str
    architectures: tuple[str, ...]
    renames: tuple[Rename, ...]
    experts: tuple[ExpertRule, ...]
    inject_gate_bias: bool = False
    # Substrings that make a weight non-quantizable, and prefixes never quantized (vision, projector).
    not_quantized: tuple[str, ...] = ()
    not_quantized_prefixes: tuple[str, ...] = ()
    text_model_types: tuple[str, ...] = ()
    layouts: tuple[tuple[str, str], ...] = field(default=())

    def to_native(self, key: str) -> str:
        for r in self.renames:
            if key.startswith(r.hf):
                return r.native + key[len(r.hf) :]
        return key

    def to_hf(self, key: str) -> str:
        for r in self.renames:
            if r.invert and key.startswith(r.native) and r.native:
                return r.hf + key[len(r.native) :]
        return key

    def quantizable(self, hf_key: str) -> bool:
        """Which tensors a fresh quantization turns into FP8 (DESIGN §3)."""
        if any(p in hf_key for p in self.not_quantized_prefixes):
            return False
        if any(p in hf_key for p in self.not_quantized):
            return False
        if hf_key.endswith(".weight"):
            return True
        return any(hf_key.endswith(r.hf) for r in self.experts if r.kind == "transpose")

    def layout(self, hf_keys: list[str]) -> str:
        """Name the key layout the checkpoint uses, decided from its keys."""
        for name, prefix in self.layouts:
            if any(k.startswith(prefix) for k in hf_keys):
                return name
        return "identity" if self.layouts else "default"


_NORMS_ETC = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "norm.weight",
    "lm_head.weight",
    "embed_tokens.weight",
    "mlp.gate.weight",
)
_VISION = ("vision_tower.", "multi_modal_projector.")
_MISTRAL4_EXPERTS = (
    ExpertRule("transpose", "mlp.experts.gate_up_proj", "mlp.experts.gate_and_up_projs"),
    ExpertRule("transpose", "mlp.experts.down_proj", "mlp.experts.down_projs"),
)

_MISTRAL4 = Adapter(
    name="mistral4",
    description="Mistral 4 text (Mistral4ForCausalLM)",
    architectures=("Mistral4ForCausalLM",),
    renames=(Rename("language_model.", "", invert=False),),
    experts=_MISTRAL4_EXPERTS,
    inject_gate_bias=True,
    not_quantized=_NORMS_ETC,
    not_quantized_prefixes=_VISION,
    text_model_types=("mistral4",),
)

ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in (
        _MISTRAL4,
        replace(
            _MISTRAL4,
            name="mistral4-vlm",
            description="Mistral3ForConditionalGeneration with a Mistral 4 text model",
            architectures=("Mistral3ForConditionalGeneration",),
            renames=(
                Rename("language_model.model.", "model.language_model.model."),
                Rename("language_model.lm_head.", "model.language_model.lm_head."),
                Rename("vision_tower.", "model.vision_tower."),
                Rename("multi_modal_projector.", "model.multi_modal_projector."),
            ),
        ),
        Adapter(
            name="mistral3-fp8",
            description="per-tensor FP8 Mistral 3 family (Mistral-3.5 VLM, Ministral-3, Devstral)",
            architectures=(
                "Mistral3ForConditionalGeneration",
                "Ministral3ForCausalLM",
                "MistralForCausalLM",
            ),
            renames=(
                Rename("language_model.lm_head.", "lm_head."),
                Rename("language_model.model.", "model.language_model."),
                Rename("vision_tower.", "model.vision_tower."),
                Rename("multi_modal_projector.", "model.multi_modal_projector."),
            ),
            experts=(),
            not_quantized=_NORMS_ETC,
            not_quantized_prefixes=_VISION,
            text_model_types=("ministral3", "mistral", "ministral"),
            layouts=(("vlm_full", "language_model."), ("vlm_full", "vision_tower.")),
        ),
        Adapter(
            name="deepseek-v3",
            description="block-wise FP8 DeepSeek-V3 / R1 family",
            architectures=("DeepseekV3ForCausalLM",),
            renames=(),
            experts=(
                ExpertRule(
                    "stack", "mlp.experts.{e}.", "mlp.experts.gate_and_up_projs", ("gate_proj", "up_proj")
                ),
                ExpertRule("stack", "mlp.experts.{e}.", "mlp.experts.down_projs", ("down_proj",)),
            ),
            not_quantized=_NORMS_ETC,
            text_model_types=("deepseek_v3",),
        ),
    )
}


def supported() -> str:
    return ", ".join(f"{a.name} ({', '.join(a.architectures)})" for a in ADAPTERS.values())


def detect(config: dict[str, Any], keys: list[str], override: str | None = None) -> Adapter:
    """Pick the adapter from ``architectures``, model types and the keys; ``override`` wins."""
    if override:
        if override not in ADAPTERS:
            raise UnsupportedModelError(f"unknown adapter {override!r}; supported: {', '.join(ADAPTERS)}")
        return ADAPTERS[override]
    archs = tuple(config.get("architectures") or ())
    model_type = config.get("model_type")
    text_type = (config.get("text_config") or {}).get("model_type")
    has_aggregated = any(re.search(r"mlp\.experts\.(gate_up|down)_proj$", k) for k in keys)
    for a in ADAPTERS.values():
        if not set(archs) & set(a.architectures) and model_type not in a.text_model_types:
            continue
        if a.name == "mistral4-vlm" and (text_type != "mistral4" and not has_aggregated):
            continue
        if a.name == "mistral3-fp8" and (text_type == "mistral4" or has_aggregated):
            continue
        return a
    raise UnsupportedModelError(
        f"config.json architectures={list(archs)} model_type={model_type!r}"
        f"{f' text_config.model_type={text_type!r}' if text_type else ''} is not supported; "
        f"supported adapters: {supported()}"
    )
