"""Model families as data: key renamings, reversible expert operations, quantization rules.

Each adapter is a value, not code: the generic planner (keymap.py) applies it in both directions.
Renames are prefix maps tried in order; the way back inverts them, unless the conversion recorded the
source's own spelling, which then wins (a stripped ``language_model.`` is not guessable).

Detection reads the same data: an adapter fits a checkpoint when its config names the adapter's family
and nothing in the config or the keys points at another family (``fits``). The planner uses it again to
refuse an override that does not fit, since verification alone cannot tell a wrong adapter apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import cached_property
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

    kind ``transpose``: aggregated ``[E, A, B]`` ↔ ``[E, B, A]`` (Mistral 4); ``hf`` ends the key.
    kind ``stack``: per-expert 2-D weights ``…experts.{e}.{part}.weight`` ↔ one ``[E, …]`` tensor whose
    slice ``e`` is ``cat(part.T for part in parts, -1)`` (DeepSeek-V3); ``hf`` is the expert module with
    ``{e}`` for its number, followed by one of ``parts`` and ``.weight``.
    """

    kind: str
    hf: str
    native: str
    parts: tuple[str, ...] = ()

    @cached_property
    def _hf_pattern(self) -> re.Pattern[str]:
        if self.kind == "stack":
            module = re.escape(self.hf).replace(re.escape("{e}"), r"(?P<e>\d+)")
            parts = "|".join(map(re.escape, self.parts))
            return re.compile(rf"^(?P<prefix>.*\.){module}(?P<part>{parts})\.weight$")
        return re.compile(rf"^(?P<prefix>.*){re.escape(self.hf)}$")

    def match_hf(self, renamed: str) -> re.Match[str] | None:
        """This rule on a renamed hf key: group ``prefix``, and for ``stack`` also ``e`` and ``part``."""
        return self._hf_pattern.match(renamed)


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
    # The architectures are shared with another family: detection takes this adapter only when
    # text_config.model_type is one of its text model types or its expert rules claim keys.
    needs_evidence: bool = False

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

    def claims_expert(self, key: str) -> bool:
        """Whether one of this adapter's expert rules takes ``key``, spelled hf or native."""
        renamed = self.to_native(key)
        return any(r.match_hf(renamed) or key.endswith(r.native) for r in self.experts)

    def quantizable(self, hf_key: str) -> bool:
        """Which tensors a fresh quantization turns into FP8 (DESIGN §3)."""
        if self.never_quantized_prefix(hf_key):
            return False
        if any(p in hf_key for p in self.not_quantized):
            return False
        if hf_key.endswith(".weight"):
            return True
        return any(hf_key.endswith(r.hf) for r in self.experts if r.kind == "transpose")

    def never_quantized_prefix(self, hf_key: str) -> str | None:
        """The prefix that keeps ``hf_key`` out of quantization; config.json names the module by it."""
        return next((p for p in self.not_quantized_prefixes if p in hf_key), None)

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
            needs_evidence=True,
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


def expert_owner(key: str) -> Adapter | None:
    """The first adapter whose expert rules take ``key``: who a stray expert tensor belongs to."""
    return next((a for a in ADAPTERS.values() if a.claims_expert(key)), None)


def fits(adapter: Adapter, config: dict[str, Any], keys: list[str]) -> bool:
    """Whether the checkpoint can be ``adapter``'s: its config names the family and nothing contradicts it.

    Contradictions are another family's text model type in ``text_config`` and keys that another
    adapter's expert rules take but this adapter's do not (they would pass through unconverted).
    """
    text_type = (config.get("text_config") or {}).get("model_type")
    named = set(config.get("architectures") or ()) & set(adapter.architectures)
    if not named and config.get("model_type") not in adapter.text_model_types:
        return False
    known_text_types = {t for a in ADAPTERS.values() for t in a.text_model_types}
    if text_type in known_text_types and text_type not in adapter.text_model_types:
        return False
    if (
        adapter.needs_evidence
        and text_type not in adapter.text_model_types
        and not any(adapter.claims_expert(k) for k in keys)
    ):
        return False
    return not any(not adapter.claims_expert(k) and expert_owner(k) for k in keys)


def detected(config: dict[str, Any], keys: list[str]) -> Adapter | None:
    """The first adapter that fits the checkpoint, or None."""
    return next((a for a in ADAPTERS.values() if fits(a, config, keys)), None)


def describe_config(config: dict[str, Any]) -> str:
    """What config.json says the model is, for error messages."""
    text_type = (config.get("text_config") or {}).get("model_type")
    return (
        f"architectures={list(config.get('architectures') or ())} model_type={config.get('model_type')!r}"
        f"{f' text_config.model_type={text_type!r}' if text_type else ''}"
    )


def detect(config: dict[str, Any], keys: list[str], override: str | None = None) -> Adapter:
    """Pick the first adapter that fits the config and the keys; ``override`` wins (planning checks it)."""
    if override:
        if override not in ADAPTERS:
            raise UnsupportedModelError(f"unknown adapter {override!r}; supported: {', '.join(ADAPTERS)}")
        return ADAPTERS[override]
    found = detected(config, keys)
    if found:
        return found
    raise UnsupportedModelError(
        f"config.json {describe_config(config)} is not supported; supported adapters: {supported()}"
    )
