"""Model families as data: key renamings, reversible expert operations, quantization rules.

Each adapter is a value, not code: the generic planner (keymap.py) applies it in both directions.
Renames are prefix maps tried in order (the first that matches wins) followed by infix maps (every one
that matches applies); the way back inverts them, unless the conversion recorded the source's own
spelling, which then wins (a stripped ``language_model.`` is not guessable).

Detection reads the same data: an adapter fits a checkpoint when its config names the adapter's family
(an architecture or a model type) and nothing in the config or the keys points at another family
(``fits``). The planner uses it again to refuse an override that does not fit, since verification alone
cannot tell a wrong adapter apart. The table follows NeMo AutoModel 0.7.0's state-dict adapters, whose
``from_hf`` output is the native layout; ``nemo`` names the one each family mirrors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Rename:
    """``hf`` becomes ``native``: as a key's prefix, or (``infix``) wherever it occurs in the key.

    ``invert`` says whether the way back may guess the hf spelling from the native one. An infix names
    whole module segments with their dots (``.block_sparse_moe.gate.weight``), so it cannot match
    part of another name; one that ends a key (``.ffn.gate.bias``, beside DeepSeek-V4.1's
    ``.ffn.gate.bias_vl``) is a ``suffix``: it matches only there.
    """

    hf: str
    native: str
    invert: bool = True
    infix: bool = False
    suffix: bool = False

    def infix_to_native(self, key: str) -> str:
        """``key`` with this infix (or suffix) rename applied where it matches."""
        return self._swapped(key, self.hf, self.native)

    def infix_to_hf(self, key: str) -> str:
        return self._swapped(key, self.native, self.hf)

    def _swapped(self, key: str, old: str, new: str) -> str:
        if self.suffix:
            return key[: -len(old)] + new if key.endswith(old) else key
        return key.replace(old, new, 1)

    @cached_property
    def _numbered(self) -> tuple[re.Pattern[str], re.Pattern[str]] | None:
        """A prefix with ``{n}`` (a module number that moves, Inkling's ``layers.linear_{n}.`` →
        ``encoder_layers.{n}.projection.``): its patterns both ways."""
        if "{n}" not in self.hf:
            return None
        return tuple(
            re.compile("^" + re.escape(s).replace(re.escape("{n}"), r"(\d+)")) for s in (self.hf, self.native)
        )

    def prefix_to_native(self, key: str) -> str | None:
        """``key`` renamed if this (prefix) rename matches it, else None."""
        return self._moved(key, 0, self.hf, self.native)

    def prefix_to_hf(self, key: str) -> str | None:
        return self._moved(key, 1, self.native, self.hf) if self.native else None

    def _moved(self, key: str, side: int, old: str, new: str) -> str | None:
        """``key`` with prefix ``old`` (``side`` of ``_numbered``) replaced by ``new``, or None."""
        if self._numbered:
            m = self._numbered[side].match(key)
            return new.format(n=m.group(1)) + key[m.end() :] if m else None
        return new + key[len(old) :] if key.startswith(old) else None


@dataclass(frozen=True)
class Unmapped:
    """A config.json field (top level or ``text_config``) that, when set, turns on something the rules do
    not map, with what NeMo does instead."""

    field: str
    why: str


@dataclass(frozen=True)
class ExpertRule:
    """One reversible expert operation, matched on renamed keys.

    kind ``transpose``: aggregated ``[E, A, B]`` ↔ ``[E, B, A]`` (Mistral 4); ``hf`` ends the key.
    kind ``stack``: per-expert 2-D weights ``…experts.{e}.{part}.weight`` ↔ one ``[E, …]`` tensor whose
    slice ``e`` is ``cat(part.T for part in parts, -1)`` (DeepSeek-V3); ``hf`` is the expert module with
    ``{e}`` for its number (``mlp.experts.{e}.``, MiniMax's ``block_sparse_moe.experts.{e}.``), followed
    by one of ``parts`` and ``.weight``, or ``.weight_packed`` where the part is stored as packed codes
    (compressed-tensors' pack-quantized spelling: Kimi K3's MXFP4 experts).
    kind ``concat``: aggregated 3-D parts ``…{hf}{part}.weight`` ``[E, O, I]`` ↔ one ``[E, I, n·O]`` tensor,
    ``cat(part.transpose(-1, -2) for part in parts, -1)`` (Step-3.5's ``moe.gate_proj`` / ``moe.up_proj``);
    ``hf`` is the module (``moe.``), without ``{e}``. operations.Concat does the tensor work.
    kind ``fp32``: ``hf`` ends the key, as for ``transpose``; the tensor is renamed and held in fp32
    (NeMo's ``_fp32_params`` holders; operations.Fp32).
    kind ``copy``: ``hf`` ends the key; an aggregated expert tensor already in the native layout, renamed
    only (Qwen3-VL-MoE's ``mlp.experts.gate_up_proj`` ``[E, H, 2I]``).
    kind ``squeeze``: ``hf`` ends the key; an hf ``[1, N]`` renamed and held as ``[N]`` (ERNIE 4.5's router
    bias); operations.Squeeze.
    kind ``unpad``: ``hf`` ends the key; an hf tensor stored zero-padded along its last dim (to a multiple
    of ``pad_to`` as written afresh; a source's own length is kept), held in fp32 with its first
    ``sizes[0]`` entries only (Kimi K3's KDA ``A_log``: 128 entries stored, ``linear_attn_config.num_heads``
    used); operations.Unpad, which refuses padding that is not zeros, since dropping it could not be undone.
    kind ``split``: ``hf`` ends the key; its rows split into one native tensor per part, ``prefix + native +
    part``, of ``sizes`` rows each (Ling's fused ``attention.query_key_value.weight`` into
    ``self_attn.{q,k,v}_proj.weight``); operations.Split does the tensor work, the way back concatenates.
    Not an expert layout, but the same kind of reversible operation, so it lives in the same table.

    ``sizes`` (``split``, ``unpad``): per part, a product of config.json fields and integers,
    ``"num_key_value_heads * head_dim"``, read from the config (or its ``text_config``) when the
    checkpoint is planned; a dotted field reads inside an object (``linear_attn_config.num_heads``).
    ``shards`` (``split``): a product of fields too, where the fused tensor is saved as that many
    tensor-parallel shards ``[Q_s | K_s | V_s]`` (MiMo-V2.5-Pro), each part's rows then split evenly
    among them; its FP8 block grid restarts at every shard (``fp8.ScaleKind.SHARDED``). ``index:FIELD``
    reads the count from ``model.safetensors.index.json``'s ``metadata`` instead, 1 where it is absent
    (MiMo-V2.5's ``tp_size``, as NeMo's MiMo-V2-Flash adapter reads it). Only a quantized tensor is
    saved so, unless ``shards_unquantized`` (that adapter regroups a bf16 one too).
    ``by_layer`` (``split``): a config.json list and a field prefix: where the list is true at the key's
    layer, each field is read with the prefix if the config has it (MiMo's ``hybrid_layer_pattern`` and
    its ``swa_*`` head counts for sliding-window layers).
    ``fused`` (``split``): the parts are gathered, part by part, into one native tensor of this name rather
    than one each (MiMo-V2.5-Pro's canonical ``[Q | K | V]`` from its shard-interleaved one).
    """

    kind: str
    hf: str
    native: str
    parts: tuple[str, ...] = ()
    sizes: tuple[str, ...] = ()
    shards: str = ""
    by_layer: tuple[str, str] = ()
    fused: str = ""
    shards_unquantized: bool = False
    pad_to: int = 0

    @cached_property
    def _hf_pattern(self) -> re.Pattern[str]:
        if self.kind in ("stack", "concat"):
            module = re.escape(self.hf).replace(re.escape("{e}"), r"(?P<e>\d+)")
            parts = "|".join(map(re.escape, self.parts))
            return re.compile(rf"^(?P<prefix>.*\.){module}(?P<part>{parts})\.weight(?:_packed)?$")
        # from a module boundary: Step's "moe.down_proj.weight" is not Kimi's "block_sparse_moe.down_proj.weight"
        return re.compile(rf"^(?P<prefix>(?:.*\.)?){re.escape(self.hf)}$")

    def match_hf(self, renamed: str) -> re.Match[str] | None:
        """This rule on a renamed hf key: group ``prefix``, for ``stack`` also ``e`` and ``part``, for
        ``concat`` also ``part``."""
        return self._hf_pattern.match(renamed)

    def split_sizes(self, config: dict[str, Any], key: str = "") -> list[int]:
        """Each part's rows (``split``) in tensor ``key``, from config.json; refuses a config that lacks a
        field they name."""
        c = {**config, **(config.get("text_config") or {})}
        prefix = ""
        if self.by_layer:
            field, prefix = self.by_layer
            m = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
            pattern = c.get(field)
            if m is None or not isinstance(pattern, list) or int(m.group(1)) >= len(pattern):
                raise UnsupportedModelError(
                    f"config.json {field} does not say which attention layer {key!r} is"
                )
            prefix = prefix if pattern[int(m.group(1))] else ""
        return [self._product(c, expr, prefix) for expr in self.sizes]

    def shard_count(self, config: dict[str, Any], index_metadata: dict[str, Any] | None = None) -> int:
        """How many shards the fused tensor is saved as (``shards``; 1 where the rule has none)."""
        if not self.shards:
            return 1
        if self.shards.startswith("index:"):
            name = self.shards[len("index:") :]
            n = (index_metadata or {}).get(name, 1)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise UnsupportedModelError(
                    f"model.safetensors.index.json metadata.{name} is {n!r}, not the positive number of "
                    f"shards {self.hf!r} is saved as"
                )
            return n
        return self._product({**config, **(config.get("text_config") or {})}, self.shards)

    @property
    def shards_from(self) -> str:
        """Where ``shard_count`` reads the count, for messages."""
        if self.shards.startswith("index:"):
            return f"metadata.{self.shards[len('index:') :]} in model.safetensors.index.json"
        return f"{self.shards} in config.json"

    def padded(self, kept: int) -> int:
        """The stored length of an ``unpad`` tensor that holds ``kept`` entries."""
        step = self.pad_to or 1
        return -(-kept // step) * step

    def _product(self, c: dict[str, Any], expr: str, prefix: str = "") -> int:
        n = 1
        for name in (f.strip() for f in expr.split("*")):
            field = prefix + name if prefix + name in c else name
            value = _field(c, field)
            if name.isdigit():
                n *= int(name)
            elif isinstance(value, int) and not isinstance(value, bool):
                n *= value
            else:
                raise UnsupportedModelError(
                    f"config.json lacks the integer {field!r} that splits {self.hf!r} ({expr})"
                )
        return n

    def hf_part(self, e: int, part: str) -> str:
        """The hf key, after ``prefix``, of expert ``e``'s ``part`` (``stack``; ``concat`` ignores ``e``)."""
        return f"{self.hf.format(e=e)}{part}.weight"


def _field(config: dict[str, Any], name: str) -> Any:
    """config.json field ``name``; ``a.b`` is field ``b`` of object ``a``."""
    value: Any = config
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


# Rule kinds that say how one tensor is held rather than lay out experts (Adapter.claims_expert).
_HELD = ("fp32", "squeeze", "unpad")


@dataclass(frozen=True)
class Adapter:
    """One model family: how its keys and experts map, what is never quantized, how it is recognised.

    Detection data: ``architectures`` (config.json ``architectures``) and ``model_types``: a top-level
    ``model_type`` among them names the family too; one in ``text_config`` (a multimodal wrapper's text
    model) only contradicts the families that do not list it. ``needs_evidence``: the
    architectures are shared with another family, so detection takes this adapter only when
    ``text_config.model_type`` is one of its model types or its expert rules claim keys.
    """

    name: str
    description: str
    architectures: tuple[str, ...]
    renames: tuple[Rename, ...]
    experts: tuple[ExpertRule, ...]
    inject_gate_bias: bool = False
    # Substrings that make a weight non-quantizable, and prefixes never quantized (vision, projector).
    not_quantized: tuple[str, ...] = ()
    not_quantized_prefixes: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    layouts: tuple[tuple[str, str], ...] = field(default=())
    needs_evidence: bool = False
    # The NeMo AutoModel 0.7.0 state-dict adapter (``module.Class`` under nemo_automodel.components.models)
    # whose from_hf output is this family's native layout; None where NeMo's model uses the hf names.
    # tests/test_nemo_oracle.py compares with it bit for bit.
    nemo: str | None = None
    # config.json fields (top level or text_config) that turn on something these rules do not map, with
    # what NeMo does instead: a checkpoint that sets one is refused while planning.
    unmapped_config: tuple[Unmapped, ...] = ()
    # Key prefixes of modules NeMo passes on unconverted (Qwen3-Omni's talker, whose experts stay per expert,
    # and code2wav): copied under their own names, and this family's, so no other family's rules take them.
    passthrough: tuple[str, ...] = ()
    # The detected family this adapter is an alternative native layout of, where NeMo's layout depends on
    # its configuration (MiMo's attention backend): never detected, taken by --adapter on that family.
    variant_of: str | None = None

    def check_config(self, config: dict[str, Any]) -> None:
        """Refuse a checkpoint whose config.json turns on what this adapter does not map."""
        for c in (config, config.get("text_config") or {}):
            for u in self.unmapped_config:
                if c.get(u.field):
                    raise UnsupportedModelError(
                        f"config.json {u.field}={c[u.field]!r}: adapter {self.name!r} does not map this ({u.why})"
                    )

    def shard_rule(self, hf_key: str) -> ExpertRule | None:
        """The split rule that saves hf tensor ``hf_key`` shard by shard (``ExpertRule.shards``), if any."""
        renamed = self.to_native(hf_key)
        return next((r for r in self.experts if r.kind == "split" and r.shards and r.match_hf(renamed)), None)

    def passes(self, key: str) -> bool:
        """Whether ``key`` (hf or native: the two spellings agree there) is passed on unconverted."""
        return key.startswith(self.passthrough) if self.passthrough else False

    def to_native(self, key: str) -> str:
        for r in self.renames:
            if not r.infix and (renamed := r.prefix_to_native(key)) is not None:
                key = renamed
                break
        for r in self.renames:
            if r.infix:
                key = r.infix_to_native(key)
        return key

    def to_hf(self, key: str) -> str:
        for r in reversed(self.renames):
            if r.infix and r.invert:
                key = r.infix_to_hf(key)
        for r in self.renames:
            if not r.infix and r.invert and (renamed := r.prefix_to_hf(key)) is not None:
                return renamed
        return key

    def claims_expert(self, key: str) -> bool:
        """Whether one of this adapter's expert rules takes ``key``, spelled hf or native. ``fp32`` and
        ``squeeze`` rules say how a tensor is held, not a layout another family could mistake (ERNIE's
        squeezed bias is named as DeepSeek's hf one), so they claim nothing.

        Module numbers do not change the answer (the rules take any), so it is worked out once per key
        with its numbers as 0: detection asks every adapter about every key, and a checkpoint's 100k keys
        are a few hundred such shapes."""
        return self.claims_shape(key_shape(key))

    def claims_shape(self, shape: str) -> bool:
        """``claims_expert`` for a key already numbered 0 (``key_shape``)."""
        known = self._claimed.get(shape)
        if known is None:
            known = self._claimed[shape] = self._claims(shape)
        return known

    @cached_property
    def _claimed(self) -> dict[str, bool]:
        """``claims_expert``'s answers by key shape, filled as asked."""
        return {}

    def _claims(self, key: str) -> bool:
        if self.passes(key):
            return True
        renamed = self.to_native(key)
        return any(r.match_hf(renamed) or key.endswith(r.native) for r in self.experts if r.kind not in _HELD)

    def quantizable(self, hf_key: str) -> bool:
        """Which tensors a fresh quantization turns into FP8 (DESIGN §3)."""
        if self.never_quantized_prefix(hf_key):
            return False
        if any(p in hf_key for p in self.not_quantized):
            return False
        if hf_key.endswith(".weight"):
            return True
        return any(hf_key.endswith(r.hf) for r in self.experts if r.kind in ("transpose", "copy"))

    def never_quantized_prefix(self, hf_key: str) -> str | None:
        """The prefix that keeps ``hf_key`` out of quantization; config.json names the module by it."""
        return next((p for p in self.not_quantized_prefixes if p in hf_key), None)

    def describe(self) -> dict[str, Any]:
        """The family and its detection rules, for ``GET /v1/adapters`` and ``recast inspect``."""
        named = [f"architectures {' / '.join(self.architectures)}"]
        if self.model_types:
            named.append(f"model_type {' / '.join(self.model_types)}")
        rule = " or ".join(named)
        if self.needs_evidence:
            rule += f", with text_config.model_type {' / '.join(self.model_types)} or its expert keys"
        if self.variant_of:
            rule = f"never detected: --adapter {self.name} on a checkpoint detected as {self.variant_of}"
        return {
            "name": self.name,
            "description": self.description,
            "architectures": list(self.architectures),
            "model_types": list(self.model_types),
            "expert_keys": [
                r.hf + (f"{{{','.join(r.parts)}}}.weight" if r.parts and r.kind != "split" else "")
                for r in self.experts
                if r.kind not in _HELD
            ],
            "detection": rule
            + "; not where an architecture, model type or expert keys of another family appear",
            "nemo_adapter": self.nemo,
        }

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
# Per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight`` stacked into NeMo's grouped tensors: the
# layout of DeepSeek-V3 and of every family whose NeMo adapter uses MoESplitExpertsStateDictMixin.
_SPLIT_EXPERTS = (
    ExpertRule("stack", "mlp.experts.{e}.", "mlp.experts.gate_and_up_projs", ("gate_proj", "up_proj")),
    ExpertRule("stack", "mlp.experts.{e}.", "mlp.experts.down_projs", ("down_proj",)),
)

# MiMo's fused qkv_proj: q, k and v rows by head counts (the swa_* ones on sliding-window layers); the
# adapters say how it is saved and held. A fresh grid over the whole interleaved tensor is not the
# per-shard one MiMo's loaders read, so a fresh quantization leaves it alone.
_MIMO_QKV = ExpertRule(
    "split",
    "self_attn.qkv_proj.weight",
    "self_attn.",
    ("q_proj.weight", "k_proj.weight", "v_proj.weight"),
    ("num_attention_heads * head_dim", "num_key_value_heads * head_dim", "num_key_value_heads * v_head_dim"),
    by_layer=("hybrid_layer_pattern", "swa_"),
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
    model_types=("mistral4",),
    nemo="mistral4.Mistral4StateDictAdapter",
)
_DEEPSEEK_V3 = Adapter(
    name="deepseek-v3",
    description="block-wise FP8 DeepSeek-V3 / R1 family",
    architectures=("DeepseekV3ForCausalLM",),
    renames=(),
    experts=_SPLIT_EXPERTS,
    not_quantized=_NORMS_ETC,
    model_types=("deepseek_v3",),
    nemo="deepseek_v3.DeepSeekV3StateDictAdapter",
)
# Step-3.5: aggregated ``moe.{gate,up,down}_proj.weight`` ``[E, out, in]``; gate and up concatenate
# into NeMo's ``gate_and_up_projs``, down is transposed; the post-sigmoid router bias is renamed.
_STEP3P5 = Adapter(
    name="step3p5",
    description="Step-3.5-Flash (aggregated moe.{gate,up,down}_proj experts), block-wise FP8",
    architectures=("Step3p5ForCausalLM",),
    renames=(Rename(".moe.router_bias", ".moe.gate.e_score_correction_bias", infix=True),),
    experts=(
        ExpertRule("concat", "moe.", "moe.experts.gate_and_up_projs", ("gate_proj", "up_proj")),
        ExpertRule("transpose", "moe.down_proj.weight", "moe.experts.down_projs"),
    ),
    not_quantized=(*_NORMS_ETC, "moe.gate.weight"),
    model_types=("step3p5",),
    nemo="step3p5.Step3p5StateDictAdapter",
)
# GatedDeltaNet's A_log / dt_bias, in NeMo's fp32 holder, its small modules kept bf16, Qwen's shared
# expert and the MTP head's fixed names (NeMo's table): shared by Qwen3.5 (MoE and dense) and Qwen3-Next.
_GDN_FP32 = (
    ExpertRule("fp32", "linear_attn.A_log", "linear_attn._fp32_params.A_log"),
    ExpertRule("fp32", "linear_attn.dt_bias", "linear_attn._fp32_params.dt_bias"),
)
_GDN_NOT_QUANTIZED = (*_NORMS_ETC, "shared_expert_gate.weight", "linear_attn.conv1d.weight")
_QWEN_SHARED_EXPERT = Rename(".mlp.shared_expert.", ".mlp.shared_experts.", infix=True)
_QWEN3_5_MTP = (
    Rename("mtp.fc.weight", "mtp.layers.0.eh_proj.weight"),
    Rename("mtp.pre_fc_norm_embedding.weight", "mtp.layers.0.enorm.weight"),
    Rename("mtp.pre_fc_norm_hidden.weight", "mtp.layers.0.hnorm.weight"),
    Rename("mtp.norm.weight", "mtp.layers.0.final_layernorm.weight"),
)
# Qwen3.5-MoE: the FP8 release splits the experts (stacked as DeepSeek's), the bf16 one aggregates them
# ``[E, 2I, H]`` (transposed as Mistral 4's); GatedDeltaNet's A_log / dt_bias move into NeMo's fp32
# holder, in fp32 whatever the release stores (Qwen3.5: fp32, Qwen3.6: bf16).
_QWEN3_5_MOE = Adapter(
    name="qwen3.5-moe",
    description="Qwen3.5 MoE, VLM and text (split block-FP8 or aggregated bf16 experts, GatedDeltaNet)",
    architectures=("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM"),
    renames=(
        Rename("model.lm_head.", "lm_head.", invert=False),
        *_QWEN3_5_MTP,
        _QWEN_SHARED_EXPERT,
    ),
    experts=(*_SPLIT_EXPERTS, *_MISTRAL4_EXPERTS, *_GDN_FP32),
    not_quantized=(*_GDN_NOT_QUANTIZED, "linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight"),
    not_quantized_prefixes=("model.visual.",),
    model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
    nemo="qwen3_5_moe.Qwen3_5MoeStateDictAdapter",
)
# GLM-5.3-Flash: DeepSeek-V3 experts under model.language_model., hyper-connection parameters renamed
# into NeMo's attn_hc / ffn_hc modules (base and scale in its fp32 holder, in their stored dtype), KDA
# A_log / dt_bias and the router bias held in fp32, as NeMo's from_hf does.
_HC = tuple(
    Rename(f".hc_{site}_{name}", f".{site}_hc.{'_fp32_params.' if name != 'fn' else ''}{name}", infix=True)
    for site in ("attn", "ffn")
    for name in ("fn", "base", "scale")
)
_GLM5_NEXT = replace(
    _DEEPSEEK_V3,
    name="glm5-next",
    description="GLM-5.3-Flash (hyper-connections, KDA linear attention, DSA), block-wise FP8",
    architectures=("Glm5NextForConditionalGeneration",),
    renames=_HC,
    experts=(
        *_SPLIT_EXPERTS,
        ExpertRule("fp32", "self_attn.A_log", "self_attn._fp32_params.A_log"),
        ExpertRule("fp32", "self_attn.dt_bias", "self_attn._fp32_params.dt_bias"),
        ExpertRule("fp32", "mlp.gate.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),
    ),
    not_quantized=(
        *_NORMS_ETC,
        *(f"self_attn.{p}_proj." for p in ("b", "f_a", "f_b", "g_a", "g_b", "k", "q", "v")),
        "conv1d.",
        "indexer.",
        "kv_b_proj.",
    ),
    not_quantized_prefixes=("model.visual.",),
    model_types=("glm5_next", "glm5_next_text"),
    nemo="glm5_next.Glm5NextStateDictAdapter",
)
# Qwen3-VL-MoE: aggregated experts already in NeMo's layout, renamed only (NeMo's adapter does no more).
_QWEN3_VL_MOE = Adapter(
    name="qwen3-vl-moe",
    description="Qwen3-VL MoE (aggregated mlp.experts.gate_up_proj [E, H, 2I]), block-wise FP8",
    architectures=("Qwen3VLMoeForConditionalGeneration",),
    renames=(),
    experts=(
        ExpertRule("copy", "mlp.experts.gate_up_proj", "mlp.experts.gate_and_up_projs"),
        ExpertRule("copy", "mlp.experts.down_proj", "mlp.experts.down_projs"),
    ),
    not_quantized=_NORMS_ETC,
    not_quantized_prefixes=("model.visual.",),
    model_types=("qwen3_vl_moe", "qwen3_vl_moe_text"),
    nemo="qwen3_vl_moe.Qwen3VLMoeStateDictAdapter",
)
# gpt-oss: aggregated experts. The MXFP4 release stores them as K_blocks / K_scales [E, out, in/32, …],
# whose value is [E, out, in] (qformat's mxfp4 row), transposed into NeMo's [E, in, out]; a bf16 release
# stores gate_up_proj [E, H, 2I] already in NeMo's layout, renamed only. The router becomes mlp.gate.
# NeMo under Transformer Engine also renames the attention sinks (the gpt-oss-te variant).
_GPT_OSS = Adapter(
    name="gpt-oss",
    description="gpt-oss (MXFP4 experts, or a bf16 release)",
    architectures=("GptOssForCausalLM",),
    renames=(
        Rename(".mlp.router.weight", ".mlp.gate.weight", infix=True),
        Rename(".mlp.router.bias", ".mlp.gate.bias", infix=True),
    ),
    experts=(
        ExpertRule("copy", "mlp.experts.gate_up_proj", "mlp.experts.gate_and_up_projs"),
        ExpertRule("copy", "mlp.experts.down_proj", "mlp.experts.down_projs"),
        ExpertRule("transpose", "mlp.experts.gate_up_proj_blocks", "mlp.experts.gate_and_up_projs"),
        ExpertRule("transpose", "mlp.experts.down_proj_blocks", "mlp.experts.down_projs"),
    ),
    not_quantized=(*_NORMS_ETC, "mlp.router.weight"),
    model_types=("gpt_oss",),
    nemo="gpt_oss.GPTOSSStateDictAdapter",
)
# Inkling (Thinking Machines): the release's raw names (model.llm., attn.wq_du, w13_weight, which
# transformers also saves) to NeMo's. The experts and shared experts are stored [E, 2I, H] / [E, H, I]
# with gate and up interleaved, a dense layer's mlp.w13_dn / w2_md as 2-D [2I, H] / [H, I]; NeMo
# transposes them all as they are (the interleave it undoes is only for transformers' in-memory layout).
_INKLING = Adapter(
    name="inkling",
    description="Inkling (Thinking Machines; raw llm/audio/visual names, interleaved gate/up experts)",
    architectures=("InklingForConditionalGeneration",),
    renames=(
        Rename("model.llm.layers.", "model.language_model.layers."),
        Rename("model.llm.embed.weight", "model.language_model.embed_tokens.weight"),
        Rename("model.llm.embed_norm.weight", "model.language_model.embed_norm.weight"),
        Rename("model.llm.norm.weight", "model.language_model.norm.weight"),
        Rename("model.llm.unembed.weight", "lm_head.weight"),
        Rename(
            "model.audio.encoder.weight", "model.audio_tower.embed_audio_tokens.embed_audio_tokens.weight"
        ),
        Rename("model.audio.final_norm.weight", "model.audio_tower.norm.weight"),
        Rename("model.visual.layers.linear_{n}.", "model.vision_tower.encoder_layers.{n}.projection."),
        Rename("model.visual.layers.norm_{n}.", "model.vision_tower.encoder_layers.{n}.layer_norm."),
        Rename("model.visual.final_norm.weight", "model.vision_tower.final_norm.weight"),
        *(
            Rename(f".attn.{raw}.weight", f".self_attn.{proj}_proj.weight", infix=True)
            for raw, proj in (("wq_du", "q"), ("wk_dv", "k"), ("wv_dv", "v"), ("wr_du", "r"), ("wo_ud", "o"))
        ),
        Rename(".attn.q_norm.weight", ".self_attn.q_norm.weight", infix=True),
        Rename(".attn.k_norm.weight", ".self_attn.k_norm.weight", infix=True),
        Rename(".attn.k_sconv.weight", ".self_attn.k_sconv._fp32_params.weight", infix=True),
        Rename(".attn.v_sconv.weight", ".self_attn.v_sconv._fp32_params.weight", infix=True),
        Rename(".attn.rel_logits_proj.proj", ".self_attn.rel_logits_proj.proj", infix=True),
        Rename(".attn_sconv.weight", ".attn_sconv._fp32_params.weight", infix=True),
        Rename(".mlp_sconv.weight", ".mlp_sconv._fp32_params.weight", infix=True),
        Rename(".attn_norm.weight", ".input_layernorm.weight", infix=True),
        Rename(".mlp_norm.weight", ".post_attention_layernorm.weight", infix=True),
        Rename(".mlp.gate.bias", ".mlp.gate._fp32_params.e_score_correction_bias", infix=True),
    ),
    experts=(
        ExpertRule("transpose", "mlp.experts.w13_weight", "mlp.experts.gate_and_up_projs"),
        ExpertRule("transpose", "mlp.experts.w2_weight", "mlp.experts.down_projs"),
        ExpertRule("transpose", "mlp.shared_experts.shared_w13_weight", "mlp.shared_experts.gate_up_proj"),
        ExpertRule("transpose", "mlp.shared_experts.shared_w2_weight", "mlp.shared_experts.down_proj"),
        ExpertRule("transpose", "mlp.w13_dn.weight", "mlp.gate_up_proj"),
        ExpertRule("transpose", "mlp.w2_md.weight", "mlp.down_proj"),
    ),
    not_quantized=(*_NORMS_ETC, "embed.weight", "unembed.weight", "sconv.weight", "rel_logits_proj"),
    not_quantized_prefixes=("model.audio.", "model.visual."),
    model_types=("inkling_mm_model", "inkling_text"),
    nemo="inkling.InklingStateDictAdapter",
)
# Nemotron-H / Nemotron 3 (hybrid Mamba-2, attention and ReLU² MoE layers, each under mixer.): the
# release's backbone. to model. (norm_f and embeddings renamed too), non-gated experts (up_proj only)
# stacked, the Mamba A_log / dt_bias / D held in fp32 as NeMo's _fp32_params. MTP layers (mtp.layers.)
# keep their prefix and get the same expert and fp32 rules, as in NeMo.
_NEMOTRON_V3 = Adapter(
    name="nemotron-v3",
    description="Nemotron-H / Nemotron 3 (Mamba-2 + attention + ReLU² MoE under mixer.)",
    architectures=("NemotronHForCausalLM",),
    renames=(
        Rename("backbone.norm_f.weight", "model.norm.weight"),
        Rename("backbone.embeddings.weight", "model.embed_tokens.weight"),
        Rename("backbone.embedding.weight", "model.embed_tokens.weight", invert=False),
        Rename("model.norm_f.weight", "model.norm.weight", invert=False),
        Rename("model.embeddings.weight", "model.embed_tokens.weight", invert=False),
        Rename("model.embedding.weight", "model.embed_tokens.weight", invert=False),
        Rename("backbone.", "model."),
    ),
    experts=(
        ExpertRule("stack", "mixer.experts.{e}.", "mixer.experts.gate_and_up_projs", ("up_proj",)),
        ExpertRule("stack", "mixer.experts.{e}.", "mixer.experts.down_projs", ("down_proj",)),
        *(
            ExpertRule("fp32", f"mixer.{name}", f"mixer._fp32_params.{name}")
            for name in ("A_log", "dt_bias", "D")
        ),
    ),
    not_quantized=(*_NORMS_ETC, "embeddings.weight", "mixer.gate.weight", "conv1d.weight"),
    model_types=("nemotron_h",),
    nemo="nemotron_v3.NemotronV3StateDictAdapter",
)
# Qwen3-Omni MoE: NeMo builds the thinker only; its from_hf strips "thinker." and stacks the split experts
# as DeepSeek-V3's (gate, up), the audio and vision towers keep their names. The way back names the four
# thinker modules (a reversible empty native side would claim every key). The talker (the Instruct
# release's speech model, experts left per expert) and code2wav pass through NeMo unconverted, so here too;
# code2wav's convolutions are never quantized.
_QWEN3_OMNI_MOE = Adapter(
    name="qwen3-omni-moe",
    description="Qwen3-Omni MoE thinker (audio and vision towers, split experts under thinker.)",
    architectures=("Qwen3OmniMoeForConditionalGeneration",),
    renames=(
        Rename("thinker.model.", "model."),
        Rename("thinker.lm_head.", "lm_head."),
        Rename("thinker.audio_tower.", "audio_tower."),
        Rename("thinker.visual.", "visual."),
        Rename("thinker.", "", invert=False),
    ),
    experts=_SPLIT_EXPERTS,
    not_quantized=_NORMS_ETC,
    not_quantized_prefixes=("thinker.audio_tower.", "thinker.visual.", "code2wav."),
    model_types=("qwen3_omni_moe",),
    nemo="qwen3_omni_moe.Qwen3OmniMoeStateDictAdapter",
    passthrough=("talker.", "code2wav."),
)
# ERNIE 4.5 MoE (ERNIE-4.5-21B-A3B / 300B-A47B -PT): split experts as DeepSeek-V3's, shared experts as they
# are; NeMo moves moe_statics.e_score_correction_bias [1, E] into the router as [E] (squeeze). NeMo drops
# the MTP head (model.mtp_*); Recast keeps it unchanged.
_ERNIE4_5_MOE = Adapter(
    name="ernie4.5-moe",
    description="ERNIE 4.5 MoE (Ernie4_5_MoeForCausalLM: split and shared experts, moe_statics router bias)",
    architectures=("Ernie4_5_MoeForCausalLM",),
    renames=(),
    experts=(
        *_SPLIT_EXPERTS,
        ExpertRule("squeeze", "mlp.moe_statics.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),
    ),
    not_quantized=_NORMS_ETC,
    model_types=("ernie4_5_moe",),
    nemo="ernie4_5.Ernie4_5_MoeStateDictAdapter",
)
# Kimi Linear (Moonshot; KDA linear attention with MLA layers): MiniMax-style block_sparse_moe experts w1, w3,
# w2 stacked, the router and shared experts moved under mlp.; the KDA A_log / dt_bias under _fp32_params and
# the router bias in fp32, as NeMo's from_hf casts them. Kimi K3 shares the model type but NeMo loads it with
# another adapter (kimi-k3): its latent MoE and attention residual fields are refused here.
_KIMI_STACKS = (
    ExpertRule("stack", "block_sparse_moe.experts.{e}.", "mlp.experts.gate_and_up_projs", ("w1", "w3")),
    ExpertRule("stack", "block_sparse_moe.experts.{e}.", "mlp.experts.down_projs", ("w2",)),
)
_KIMI_ROUTER_BIAS = ExpertRule("fp32", "mlp.gate.e_score_correction_bias", "mlp.gate.e_score_correction_bias")
_KIMI_KDA_DT_BIAS = ExpertRule("fp32", "self_attn.dt_bias", "self_attn._fp32_params.dt_bias")
_KIMI_NOT_QUANTIZED = (
    *_NORMS_ETC,
    "block_sparse_moe.gate.weight",
    "conv1d.weight",
    *(f"self_attn.{p}_proj." for p in ("b", "f_a", "f_b", "g_a", "g_b")),
)
_KIMI_LINEAR = Adapter(
    name="kimi-linear",
    description="Kimi Linear (KDA + MLA hybrid, block_sparse_moe experts w1, w3, w2)",
    architectures=("KimiLinearForCausalLM", "KimiLinear48BForCausalLM"),
    renames=(
        Rename(".block_sparse_moe.gate.", ".mlp.gate.", infix=True),
        Rename(".block_sparse_moe.shared_experts.", ".mlp.shared_experts.", infix=True),
    ),
    experts=(
        *_KIMI_STACKS,
        ExpertRule("fp32", "self_attn.A_log", "self_attn._fp32_params.A_log"),
        _KIMI_KDA_DT_BIAS,
        _KIMI_ROUTER_BIAS,
    ),
    not_quantized=_KIMI_NOT_QUANTIZED,
    model_types=("kimi_linear", "kimi_linear_48b_a3b"),
    nemo="kimi_linear.KimiLinear48BStateDictAdapter",
    unmapped_config=(
        Unmapped(
            "routed_expert_hidden_size", "Kimi K3's latent MoE: a Kimi K3 checkpoint is adapter kimi-k3's"
        ),
        Unmapped(
            "attn_res_block_size", "Kimi K3's attention residuals: a Kimi K3 checkpoint is adapter kimi-k3's"
        ),
    ),
)
# Kimi K3 (Moonshot; NeMo's KimiK3StateDictAdapter): Kimi Linear's tensors under language_model. (the vision
# tower and projector keep their names), a latent MoE whose routed_expert_{down,up}_proj / routed_expert_norm
# move under mlp. with the router and shared experts, attention residual mixers (*_res_norm, *_res_proj) kept
# as they are, the KDA short convolutions and output norm in fp32 holders of their own, A_log stored padded
# with zeros to 128 entries (NeMo keeps linear_attn_config.num_heads of them), and the routed experts released
# as MXFP4 in compressed-tensors' mxfp4-pack-quantized spelling (K.weight_packed beside K.weight_scale).
_KIMI_K3 = Adapter(
    name="kimi-k3",
    description="Kimi K3 (KDA + MLA hybrid with a latent MoE under language_model., MXFP4 experts)",
    architectures=("KimiK3ForConditionalGeneration", "KimiK3ForCausalLM"),
    renames=(
        Rename("language_model.model.", "model."),
        Rename("language_model.lm_head.", "lm_head."),
        *(
            Rename(f".block_sparse_moe.{m}.", f".mlp.{m}.", infix=True)
            for m in (
                "gate",
                "shared_experts",
                "routed_expert_down_proj",
                "routed_expert_up_proj",
                "routed_expert_norm",
            )
        ),
    ),
    experts=(
        *_KIMI_STACKS,
        ExpertRule(
            "unpad",
            "self_attn.A_log",
            "self_attn._fp32_params.A_log",
            sizes=("linear_attn_config.num_heads",),
            pad_to=128,
        ),
        _KIMI_KDA_DT_BIAS,
        *(
            ExpertRule("fp32", f"self_attn.{m}.weight", f"self_attn.{m}._fp32_params.weight")
            for m in ("q_conv1d", "k_conv1d", "v_conv1d", "o_norm")
        ),
        _KIMI_ROUTER_BIAS,
    ),
    not_quantized=(*_KIMI_NOT_QUANTIZED, "_res_proj.weight"),
    not_quantized_prefixes=("vision_tower.", "mm_projector."),
    # the text model's (text_config.model_type, or a text-only release's own) is kimi_linear
    model_types=("kimi_k3", "kimi_linear"),
    nemo="kimi_k3.KimiK3StateDictAdapter",
)
# Laguna (Poolside): split experts, the shared expert renamed as Qwen's, the router bias (stored beside the
# experts) moved into the gate in its stored dtype, as NeMo's from_hf does.
_LAGUNA = Adapter(
    name="laguna",
    description="Laguna (Poolside: sliding and full attention with an output gate, sigmoid MoE, shared expert)",
    architectures=("LagunaForCausalLM",),
    renames=(
        _QWEN_SHARED_EXPERT,
        Rename(".mlp.experts.e_score_correction_bias", ".mlp.gate.e_score_correction_bias", infix=True),
    ),
    experts=_SPLIT_EXPERTS,
    not_quantized=(*_NORMS_ETC, "self_attn.g_proj.weight"),
    model_types=("laguna",),
    nemo="laguna.LagunaStateDictAdapter",
)
# Hy3 / Hy3-preview / Hy-MT2 (HYV3ForCausalLM, NeMo's hy_v3 and hy_mt2 adapters map alike): split experts,
# the router, its bias and the shared expert renamed into NeMo's MoE names. NeMo drops the MTP layer
# (layers.{num_hidden_layers}.); Recast keeps it, renamed and stacked like the others.
_HY_V3 = Adapter(
    name="hy-v3",
    description="Hy3 / Hy3-preview / Hy-MT2 (HYV3ForCausalLM: router.gate, expert_bias, shared_mlp)",
    architectures=("HYV3ForCausalLM",),
    renames=(
        Rename(".mlp.router.gate.weight", ".mlp.gate.weight", infix=True),
        Rename(".mlp.expert_bias", ".mlp.gate.e_score_correction_bias", infix=True),
        Rename(".mlp.shared_mlp.", ".mlp.shared_experts.", infix=True),
    ),
    experts=_SPLIT_EXPERTS,
    not_quantized=(*_NORMS_ETC, "mlp.router.gate.weight"),
    model_types=("hy_v3",),
    nemo="hy_v3.HYV3StateDictAdapter",
)
# DeepSeek-V4: the release's own names (DeepSeek's inference module tree: embed., layers.{i}.attn.wq_a,
# ffn.experts.{e}.w1, hc_attn_fn, mtp.{k}.) to NeMo's, which mirror transformers' model. The infix renames
# are a chain: each later one is written on what the earlier ones made (".attn." has become ".self_attn."
# when the indexer's rules run), so the way back, undoing them last to first, meets each native spelling
# in the form its rule wrote. The indexer's own compressor folds into the indexer (its norm, ape, wgate,
# wkv), the rest of the indexer moves under the attention's compressor. A top-level hc_head_* keeps a
# "model." of its own so the MTP-local hc_head rule does not claim it on the way back. MTP layers
# (mtp.{k}.) become mtp.layers.{k}. with the layer rules, as NeMo renumbers them. Routed experts are FP4
# (Flash) or FP8 (Base) per-expert weights, stacked as DeepSeek-V3's.
_V4_CHAIN = (
    (".attn.", ".self_attn."),
    (".self_attn.indexer.", ".self_attn.compressor.indexer."),
    (".self_attn.compressor.indexer.compressor.norm.", ".self_attn.compressor.indexer.kv_norm."),
    (".self_attn.compressor.indexer.compressor.ape", ".self_attn.compressor.indexer.ape_param.weight"),
    (".self_attn.compressor.indexer.compressor.wgate.", ".self_attn.compressor.indexer.wgate."),
    (".self_attn.compressor.indexer.compressor.wkv.", ".self_attn.compressor.indexer.wkv."),
    (".self_attn.compressor.norm.", ".self_attn.compressor.kv_norm."),
    (".self_attn.compressor.ape", ".self_attn.compressor.ape_param.weight"),
    (".self_attn.attn_sink", ".self_attn.sinks_param.weight"),
    (".attn_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    (".ffn.", ".mlp."),
    (".mlp.gate.bias", ".mlp.gate.e_score_correction_bias"),
    (".mlp.shared_experts.w1.", ".mlp.shared_experts.gate_proj."),
    (".mlp.shared_experts.w3.", ".mlp.shared_experts.up_proj."),
    (".mlp.shared_experts.w2.", ".mlp.shared_experts.down_proj."),
    *((f".hc_{site}_{p}", f".{site}_hc.{p}") for site in ("attn", "ffn") for p in ("fn", "base", "scale")),
    *((f".hc_head_{p}", f".hc_head.hc_{p}") for p in ("fn", "base", "scale")),
)
# The top-level names both DeepSeek-V4 releases (V4, V4.1) share, and what both leave unquantized.
_V4_RELEASE_PREFIXES = (
    Rename("embed.", "model.embed_tokens."),
    Rename("norm.", "model.norm."),
    Rename("head.", "lm_head."),
    Rename("layers.", "model.layers."),
    Rename("vision.", "model.vision."),
    Rename("aligner.", "model.aligner."),
    Rename("image_", "model.image_"),
)
_V4_NOT_QUANTIZED = ("norm.weight", "head.weight", "embed.weight", "ffn.gate.", "attn_sink")


def _w123_experts(ffn: str) -> tuple[ExpertRule, ...]:
    """DeepSeek's inference names for routed experts under ``ffn`` (``w1`` gate, ``w3`` up, ``w2`` down),
    stacked as DeepSeek-V3's."""
    return (
        ExpertRule("stack", ffn + "experts.{e}.", ffn + "experts.gate_and_up_projs", ("w1", "w3")),
        ExpertRule("stack", ffn + "experts.{e}.", ffn + "experts.down_projs", ("w2",)),
    )


_DEEPSEEK_V4 = Adapter(
    name="deepseek-v4",
    description="DeepSeek-V4 (the release's names; FP8 with e8m0 block scales, FP4 routed experts)",
    architectures=("DeepseekV4ForCausalLM",),
    renames=(
        *_V4_RELEASE_PREFIXES,
        Rename("hc_head_", "model.hc_head_"),
        Rename("mtp.{n}.", "mtp.layers.{n}."),
        *(Rename(hf, native, infix=True) for hf, native in _V4_CHAIN),
    ),
    experts=_w123_experts("mlp."),
    # NeMo's _NON_QUANTIZED_PATTERNS: norms, head, embeddings, router, sinks, both compressors' gate / kv /
    # ape, the indexer's weights_proj and the latent projections.
    not_quantized=(
        *_V4_NOT_QUANTIZED,
        "compressor.wgate.weight",
        "compressor.wkv.weight",
        "indexer.weights_proj.weight",
        "latent_proj.weight",
    ),
    not_quantized_prefixes=("vision.", "aligner."),
    model_types=("deepseek_v4",),
    nemo="deepseek_v4.DeepSeekV4StateDictAdapter",
)
# DeepSeek-V4.1: the release's names as V4's, but NeMo keeps the attention and FFN module names (attn.,
# ffn., attn_norm) and renames only the sink, the router bias, the shared experts' w1 / w3 / w2 and the
# hyper-connection mixers. The MTP (DSpark draft) layers keep their mtp.{k}. prefix with the same renames
# inside, as NeMo's DSpark adapter has them (its backbone adapter drops them); Engram modules keep their
# names. Dense weights carry e8m0 scales per 32x32 block, routed experts are FP4 (as V4-Flash's).
_DEEPSEEK_V41 = Adapter(
    name="deepseek-v4.1",
    description="DeepSeek-V4.1 (the release's names; FP8 with e8m0 32x32 block scales, FP4 routed experts, "
    "Engram tables)",
    architectures=("DeepseekV41ForCausalLM",),
    renames=(
        *_V4_RELEASE_PREFIXES,
        Rename(".attn.attn_sink", ".attn.sinks_param.weight", infix=True, suffix=True),
        Rename(".ffn.gate.bias", ".ffn.gate.e_score_correction_bias", infix=True, suffix=True),
        Rename(".ffn.shared_experts.w1.", ".ffn.shared_experts.gate_proj.", infix=True),
        Rename(".ffn.shared_experts.w3.", ".ffn.shared_experts.up_proj.", infix=True),
        Rename(".ffn.shared_experts.w2.", ".ffn.shared_experts.down_proj.", infix=True),
        *(
            Rename(f".hc_{site}_{p}", f".{site}_hc.{p}", infix=True, suffix=True)
            for site in ("attn", "ffn")
            for p in ("fn", "base", "scale")
        ),
    ),
    experts=_w123_experts("ffn."),
    # NeMo's to_hf quantizes attn.{wq_a,wq_b,wkv,wo_a,wo_b}, indexer.wq_b, the experts and engram.{embed,wkv}
    # only; a fresh quantization leaves the rest, and the Engram table (named as the embeddings are), alone.
    not_quantized=(
        *_V4_NOT_QUANTIZED,
        "compressor.",
        "indexer.wk.",
        "indexer.weights_proj.",
        "hc_",
        "e_proj.",
        "h_proj.",
    ),
    not_quantized_prefixes=("vision.", "aligner."),
    model_types=("deepseek_v41", "deepseek_v41_text"),
    nemo="deepseek_v41.DeepseekV41StateDictAdapter",
)
# Dense families: NeMo AutoModel's own model classes use the hf key names, so only the FP8 rules apply.
_DENSE = Adapter(
    name="llama",
    description="Llama 2 / 3 dense (LlamaForCausalLM)",
    architectures=("LlamaForCausalLM",),
    renames=(),
    experts=(),
    not_quantized=_NORMS_ETC,
    model_types=("llama",),
)

# MiMo-V2.5 / V2.6 as MiMoV2ForCausalLM, which NeMo loads with its MiMo-V2-Flash adapter: the fused
# qkv_proj, saved as index metadata.tp_size shards whatever its dtype, split into q/k/v_proj.
_MIMO_V2 = replace(
    _DEEPSEEK_V3,
    name="mimo-v2",
    description="MiMo-V2.5 / V2.6 (MiMoV2ForCausalLM: fused qkv_proj saved per tensor-parallel shard, "
    "split into q/k/v, NeMo's non-Transformer-Engine attention names), block-wise FP8",
    architectures=("MiMoV2ForCausalLM",),
    experts=(*_SPLIT_EXPERTS, replace(_MIMO_QKV, shards="index:tp_size", shards_unquantized=True)),
    not_quantized=(*_NORMS_ETC, "self_attn.o_proj.weight", "self_attn.qkv_proj.weight"),
    model_types=(),
    nemo="mimo_v2_flash.MiMoV2FlashStateDictAdapter",
)
# Under Transformer Engine, NeMo's MiMo adapters hold the attention sink as the attention module's offset.
_MIMO_TE_SINK = ExpertRule("fp32", "self_attn.attention_sink_bias", "self_attn.attn_module.softmax_offset")

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
            nemo="mistral4.Mistral4MultimodalStateDictAdapter",
        ),
        Adapter(
            name="mistral3-fp8",
            description="per-tensor FP8 Mistral 3 family (Mistral-3.5 VLM, Ministral-3, Devstral), Mistral dense",
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
            model_types=("ministral3", "mistral", "ministral"),
            layouts=(("vlm_full", "language_model."), ("vlm_full", "vision_tower.")),
            nemo="mistral3.Mistral3FP8StateDictAdapter",
        ),
        _DEEPSEEK_V3,
        replace(
            _DEEPSEEK_V3,
            name="kimi-k2",
            description="Kimi K2 (DeepSeek-V3 architecture, model_type kimi_k2), block-wise FP8",
            model_types=("kimi_k2",),
        ),
        replace(
            _DEEPSEEK_V3,
            name="deepseek-v32",
            description="DeepSeek-V3.2 (sparse-attention indexer), block-wise FP8",
            architectures=("DeepseekV32ForCausalLM",),
            not_quantized=(*_NORMS_ETC, "indexer.k_norm.weight", "indexer.weights_proj.weight"),
            model_types=("deepseek_v32",),
            nemo="deepseek_v32.DeepSeekV32StateDictAdapter",
        ),
        replace(
            _DEEPSEEK_V3,
            name="glm-moe-dsa",
            description="GLM-5 (GLM MoE with DeepSeek sparse attention), block-wise FP8",
            architectures=("GlmMoeDsaForCausalLM",),
            not_quantized=(*_NORMS_ETC, "eh_proj.weight", "indexer.weights_proj.weight"),
            model_types=("glm_moe_dsa",),
            nemo="glm_moe_dsa.GlmMoeDsaStateDictAdapter",
        ),
        replace(
            _DEEPSEEK_V3,
            name="ling-v2",
            description="Ling 2.0 / Ring 2.0 MoE (BailingMoeV2: fused query_key_value), bf16 releases",
            architectures=("BailingMoeV2ForCausalLM",),
            renames=(
                Rename("model.word_embeddings.", "model.embed_tokens."),
                Rename(".attention.dense.", ".self_attn.o_proj.", infix=True),
                Rename(".attention.query_layernorm.", ".self_attn.q_norm.", infix=True),
                Rename(".attention.key_layernorm.", ".self_attn.k_norm.", infix=True),
                Rename(".mlp.gate.expert_bias", ".mlp.gate.e_score_correction_bias", infix=True),
            ),
            experts=(
                *_SPLIT_EXPERTS,
                ExpertRule(
                    "split",
                    "attention.query_key_value.weight",
                    "self_attn.",
                    ("q_proj.weight", "k_proj.weight", "v_proj.weight"),
                    (
                        "num_attention_heads * head_dim",
                        "num_key_value_heads * head_dim",
                        "num_key_value_heads * head_dim",
                    ),
                ),
            ),
            not_quantized=(*_NORMS_ETC, "word_embeddings.weight"),
            model_types=(),
            nemo="ling_v2.BailingMoeV2StateDictAdapter",
            # NeMo's adapter splits the fused weight only; a fused bias would reach its q/k/v_proj unsplit
            unmapped_config=(
                Unmapped("use_qkv_bias", "NeMo 0.7.0 splits query_key_value.weight, not its bias"),
            ),
        ),
        replace(
            _DEEPSEEK_V3,
            name="qwen3-moe",
            description="Qwen3 MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder), block-wise FP8",
            architectures=("Qwen3MoeForCausalLM",),
            model_types=("qwen3_moe",),
            nemo="qwen3_moe.Qwen3MoeStateDictAdapter",
        ),
        replace(
            _DEEPSEEK_V3,
            name="glm4-moe",
            description="GLM-4.5 / 4.6 / 4.7 MoE and GLM-4.7-Flash (lite), block-wise FP8",
            architectures=("Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM"),
            model_types=("glm4_moe", "glm4_moe_lite"),
            nemo="glm4_moe.Glm4MoeStateDictAdapter",
        ),
        replace(
            _DEEPSEEK_V3,
            name="mimo-v2-flash",
            description="MiMo-V2-Flash (split q/k/v, NeMo's non-Transformer-Engine attention names), "
            "block-wise FP8",
            architectures=("MiMoV2FlashForCausalLM",),
            not_quantized=(*_NORMS_ETC, "self_attn.o_proj.weight"),
            model_types=("mimo_v2_flash",),
            nemo="mimo_v2_flash.MiMoV2FlashStateDictAdapter",
        ),
        replace(
            _DEEPSEEK_V3,
            name="mimo-v2-flash-te",
            description="MiMo-V2-Flash for NeMo's Transformer Engine attention: the attention sink "
            "becomes attn_module.softmax_offset, fp32",
            architectures=("MiMoV2FlashForCausalLM",),
            experts=(
                *_SPLIT_EXPERTS,
                _MIMO_TE_SINK,
            ),
            not_quantized=(*_NORMS_ETC, "self_attn.o_proj.weight"),
            model_types=("mimo_v2_flash",),
            nemo="mimo_v2_flash.MiMoV2FlashStateDictAdapter",
            variant_of="mimo-v2-flash",
        ),
        _MIMO_V2,
        replace(
            _MIMO_V2,
            name="mimo-v2-te",
            description="MiMo-V2.5 / V2.6 for NeMo's Transformer Engine attention: the attention sink becomes "
            "attn_module.softmax_offset, fp32",
            experts=(*_MIMO_V2.experts, _MIMO_TE_SINK),
            variant_of="mimo-v2",
        ),
        # MiMo-V2.5-Pro saves its fused qkv_proj shard by shard, one shard per key/value head; NeMo's
        # adapter regroups an FP8 one into [Q | K | V] (a bf16 one, as NeMo's own to_hf writes it, is that
        # already) with the swa_* head counts on sliding-window layers.
        replace(
            _DEEPSEEK_V3,
            name="mimo-v2.5-pro",
            description="MiMo-V2.5-Pro (MiMoV25ForCausalLM: fused qkv_proj saved per tensor-parallel shard, "
            "regrouped), block-wise FP8",
            architectures=("MiMoV25ForCausalLM",),
            experts=(
                *_SPLIT_EXPERTS,
                replace(_MIMO_QKV, shards="num_key_value_heads", fused="qkv_proj.weight"),
            ),
            not_quantized=(*_NORMS_ETC, "self_attn.o_proj.weight", "self_attn.qkv_proj.weight"),
            model_types=(),
            nemo="mimo_v25.MiMoV2StateDictAdapter",
        ),
        replace(
            _DEEPSEEK_V3,
            name="minimax-m2",
            description="MiniMax-M2 / M2.1 (block_sparse_moe experts w1, w3, w2), block-wise FP8",
            architectures=("MiniMaxM2ForCausalLM",),
            renames=(
                Rename(".block_sparse_moe.gate.weight", ".mlp.gate.weight", infix=True),
                Rename(
                    ".block_sparse_moe.e_score_correction_bias",
                    ".mlp.gate.e_score_correction_bias",
                    infix=True,
                ),
            ),
            experts=(
                ExpertRule(
                    "stack", "block_sparse_moe.experts.{e}.", "mlp.experts.gate_and_up_projs", ("w1", "w3")
                ),
                ExpertRule("stack", "block_sparse_moe.experts.{e}.", "mlp.experts.down_projs", ("w2",)),
            ),
            not_quantized=(*_NORMS_ETC, "block_sparse_moe.gate.weight"),
            model_types=("minimax_m2",),
            nemo="minimax_m2.MiniMaxM2StateDictAdapter",
        ),
        # MiniMax-M3 VLM: M2's experts and router under language_model., shared experts beside mlp, the
        # sparse-attention indexer under self_attn.indexer.; MXFP8 (e8m0 exponents per 32 columns) on the
        # attention, dense and expert projections only, as NeMo's _MXFP8_QUANT_KEY_RE lists them.
        Adapter(
            name="minimax-m3",
            description="MiniMax-M3 VLM (block_sparse_moe experts w1, w3, w2; sparse-attention indexer), MXFP8",
            architectures=("MiniMaxM3SparseForConditionalGeneration",),
            renames=(
                Rename("language_model.model.", "model."),
                Rename("language_model.lm_head.", "lm_head."),
                Rename("multi_modal_projector.", "vision_tower.multi_modal_projector."),
                Rename("patch_merge_mlp.", "vision_tower.patch_merge_mlp."),
                Rename(".block_sparse_moe.gate.weight", ".mlp.gate.weight", infix=True),
                Rename(
                    ".block_sparse_moe.e_score_correction_bias",
                    ".mlp.gate.e_score_correction_bias",
                    infix=True,
                ),
                Rename(".block_sparse_moe.shared_experts.", ".shared_experts.", infix=True),
                Rename(".self_attn.index_", ".self_attn.indexer.index_", infix=True),
            ),
            experts=(
                ExpertRule(
                    "stack", "block_sparse_moe.experts.{e}.", "mlp.experts.gate_and_up_projs", ("w1", "w3")
                ),
                ExpertRule("stack", "block_sparse_moe.experts.{e}.", "mlp.experts.down_projs", ("w2",)),
            ),
            not_quantized=(*_NORMS_ETC, "block_sparse_moe.gate.weight", "self_attn.index_"),
            not_quantized_prefixes=("vision_tower.", "multi_modal_projector.", "patch_merge_mlp."),
            # its text_config.model_type is minimax_m3_vl_text
            model_types=("minimax_m3_vl", "minimax_m3_vl_text"),
            nemo="minimax_m3_vl.MiniMaxM3VLStateDictAdapter",
        ),
        _QWEN3_5_MOE,
        # Qwen3-Next: Qwen3.5-MoE's text model before it (fused in_proj_qkvz / in_proj_ba, split experts in
        # both releases, no MTP renames in NeMo's adapter: MTP keys pass through as they are named).
        Adapter(
            name="qwen3-next",
            description="Qwen3-Next (Qwen3-Next-80B-A3B, Qwen3-Coder-Next: GatedDeltaNet, split experts), "
            "block-wise FP8",
            architectures=("Qwen3NextForCausalLM",),
            renames=(_QWEN_SHARED_EXPERT,),
            experts=(*_SPLIT_EXPERTS, *_GDN_FP32),
            not_quantized=(*_GDN_NOT_QUANTIZED, "linear_attn.in_proj_ba.weight"),
            model_types=("qwen3_next",),
            nemo="qwen3_next.Qwen3NextStateDictAdapter",
        ),
        # Qwen3.5 / 3.6 dense (Qwen3.5-27B): Qwen3.5-MoE without experts; NeMo's dense adapter renames the
        # MTP head and holds A_log / dt_bias in fp32, nothing else.
        replace(
            _QWEN3_5_MOE,
            name="qwen3.5",
            description="Qwen3.5 / 3.6 dense, VLM and text (GatedDeltaNet), block-wise FP8",
            architectures=("Qwen3_5ForConditionalGeneration", "Qwen3_5ForCausalLM"),
            renames=_QWEN3_5_MTP,
            experts=_GDN_FP32,
            model_types=("qwen3_5", "qwen3_5_text"),
            nemo="qwen3_5.Qwen3_5DenseStateDictAdapter",
        ),
        _QWEN3_VL_MOE,
        _QWEN3_OMNI_MOE,
        _HY_V3,
        _ERNIE4_5_MOE,
        _KIMI_LINEAR,
        _KIMI_K3,
        _LAGUNA,
        _GLM5_NEXT,
        _DEEPSEEK_V4,
        _DEEPSEEK_V41,
        _STEP3P5,
        replace(
            _STEP3P5,
            name="step3p7",
            description="Step-3.7 VLM (a Step-3.5 text model under model.language_model.), block-wise FP8",
            architectures=("Step3p7ForConditionalGeneration",),
            renames=(
                Rename("model.", "model.language_model."),
                Rename("vision_model.", "model.vision_model."),
                Rename("vit_large_projector.", "model.vit_large_projector."),
                *_STEP3P5.renames,
            ),
            not_quantized_prefixes=("vision_model.", "vit_large_projector."),
            # its text_config.model_type is step3p5
            model_types=("step3p7", "step3p5"),
            nemo="step3p7.Step3p7StateDictAdapter",
            unmapped_config=(
                Unmapped(
                    "num_nextn_predict_layers",
                    "NeMo moves the MTP layers that follow num_hidden_layers to mtp.layers.{i}",
                ),
            ),
        ),
        _INKLING,
        _NEMOTRON_V3,
        _GPT_OSS,
        replace(
            _GPT_OSS,
            name="gpt-oss-te",
            description="gpt-oss for NeMo's Transformer Engine attention: the attention sinks become "
            "attn_module.softmax_offset",
            renames=(
                *_GPT_OSS.renames,
                Rename(".self_attn.sinks", ".self_attn.attn_module.softmax_offset", infix=True),
            ),
            variant_of="gpt-oss",
        ),
        _DENSE,
        replace(
            _DENSE,
            name="gemma3",
            description="Gemma 3 text (Gemma3ForCausalLM), block-wise FP8",
            architectures=("Gemma3ForCausalLM",),
            model_types=("gemma3_text",),
        ),
        replace(
            _DENSE,
            name="gemma3-vlm",
            description="Gemma 3 VLM (Gemma3ForConditionalGeneration), block-wise FP8 text model",
            architectures=("Gemma3ForConditionalGeneration",),
            # transformers' own renames, which NeMo gets by loading Gemma 3 through its class; a checkpoint
            # already spelled model.language_model. matches none of them and keeps its keys
            renames=(
                Rename("language_model.model.", "model.language_model."),
                Rename("language_model.lm_head.", "lm_head."),
                Rename("vision_tower.", "model.vision_tower."),
                Rename("multi_modal_projector.", "model.multi_modal_projector."),
            ),
            not_quantized_prefixes=_VISION,
            # its text_config.model_type is gemma3_text
            model_types=("gemma3", "gemma3_text"),
        ),
        replace(
            _DENSE,
            name="qwen3",
            description="Qwen3 dense (Qwen3ForCausalLM), block-wise FP8",
            architectures=("Qwen3ForCausalLM",),
            model_types=("qwen3",),
        ),
        # Gemma 4 dense (31B, E4B, …): NeMo loads it through transformers' class, the hf names as they are. The
        # MoE variant shares the architecture; NeMo folds its per_expert_scale into down_projs: refused.
        replace(
            _DENSE,
            name="gemma4",
            description="Gemma 4 dense (Gemma4ForConditionalGeneration without the MoE block, Gemma4ForCausalLM)",
            architectures=("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM"),
            not_quantized=(*_NORMS_ETC, "embed_tokens_per_layer.weight"),
            not_quantized_prefixes=(
                "model.vision_tower.",
                "model.embed_vision.",
                "model.audio_tower.",
                "model.embed_audio.",
            ),
            model_types=("gemma4", "gemma4_text"),
            unmapped_config=(
                Unmapped(
                    "enable_moe_block",
                    "NeMo's Gemma4MoEStateDictAdapter folds router.per_expert_scale into down_projs and writes ones "
                    "on the way back, which cannot be undone",
                ),
            ),
        ),
        # Gemma 4 Unified: NeMo's adapter renames the published vision embedder into its embed_vision module
        # (with or without the model. prefix); the rest keeps the hf names.
        replace(
            _DENSE,
            name="gemma4-unified",
            description="Gemma 4 Unified (Gemma4UnifiedForConditionalGeneration)",
            architectures=("Gemma4UnifiedForConditionalGeneration",),
            renames=tuple(
                Rename(f"{p}{hf}", f"{p}{native}")
                for p in ("model.", "")
                for hf, native in (
                    (
                        "embed_vision.embedding_projection.",
                        "embed_vision.multimodal_embedder.embedding_projection.",
                    ),
                    *(
                        (f"vision_embedder.{m}", f"embed_vision.{m}")
                        for m in ("patch_ln1.", "patch_dense.", "patch_ln2.", "pos_embedding", "pos_norm.")
                    ),
                )
            ),
            not_quantized=(*_NORMS_ETC, "embed_tokens_per_layer.weight"),
            not_quantized_prefixes=("vision_embedder.", "embed_vision.", "embed_audio."),
            model_types=("gemma4_unified", "gemma4_unified_text"),
            nemo="gemma4_unified.Gemma4UnifiedStateDictAdapter",
        ),
        # NeMo's Ernie4_5StateDictAdapter is the identity
        replace(
            _DENSE,
            name="ernie4.5",
            description="ERNIE 4.5 dense (Ernie4_5ForCausalLM)",
            architectures=("Ernie4_5ForCausalLM",),
            model_types=("ernie4_5",),
        ),
    )
}


def supported() -> str:
    return ", ".join(f"{a.name} ({', '.join(a.architectures)})" for a in ADAPTERS.values())


# A key segment that is a number: a layer's, an expert's.
_MODULE_NUMBER = re.compile(r"(?<![^.])\d+(?![^.])")


def key_shape(key: str) -> str:
    """``key`` with each module number 0: what expert rules and renames see of it."""
    return _MODULE_NUMBER.sub("0", key)


def expert_owner(key: str) -> Adapter | None:
    """The first adapter whose expert rules take ``key``: who a stray expert tensor belongs to."""
    shape = key_shape(key)
    return next((a for a in ADAPTERS.values() if a.claims_shape(shape)), None)


def fits(adapter: Adapter, config: dict[str, Any], keys: list[str]) -> bool:
    """Whether the checkpoint can be ``adapter``'s: its config names the family and nothing contradicts it.

    Contradictions are an architecture or a model type (top level or ``text_config``) that only other
    families claim, and keys that another adapter's expert rules take but this adapter's do not (they
    would pass through unconverted).
    """
    if adapter.variant_of:
        return False
    text_type = (config.get("text_config") or {}).get("model_type")
    types = {config.get("model_type"), text_type} - {None}
    architectures = set(config.get("architectures") or ())
    named = architectures & set(adapter.architectures)
    if not named and config.get("model_type") not in adapter.model_types:
        return False
    if not named and architectures & {n for a in ADAPTERS.values() for n in a.architectures}:
        return False
    known_types = {t for a in ADAPTERS.values() for t in a.model_types}
    if types & (known_types - set(adapter.model_types)):
        return False
    shapes = {key_shape(k) for k in keys}
    if (
        adapter.needs_evidence
        and text_type not in adapter.model_types
        and not any(map(adapter.claims_shape, shapes))
    ):
        return False
    owners = [a for a in ADAPTERS.values() if a is not adapter]
    return not any(not adapter.claims_shape(s) and any(a.claims_shape(s) for a in owners) for s in shapes)


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
