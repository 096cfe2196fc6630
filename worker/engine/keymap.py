"""The key plan: which hf tensors make which native tensor, and through which reversible operation.

Built from an hf checkpoint's keys by applying an adapter, or read back from a native checkpoint's
sidecar (which keeps the source's exact spelling), or — for a native checkpoint Recast did not write —
derived from the native keys by inverting the adapter's rules. Every source key ends up accounted for,
and an adapter whose rules do not account for the checkpoint is refused here, before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .adapters import ADAPTERS, Adapter, ExpertRule, describe_config, detected, expert_owner, fits, supported
from .checkpoint import Checkpoint
from .errors import AdapterMismatchError, CheckpointError
from .fp8 import BLOCK, ScaleKind, classify_sharded, value_shape
from .qformat import FP8_FORMAT, QuantFormat, source_format
from .safetensors_io import TensorInfo


@dataclass(frozen=True)
class Quant:
    """An hf tensor's FP8 companions: its scale, for static activation schemes an activation scale, and
    (compressed-tensors) a zero point, which is all zeros for the symmetric FP8 Recast reads."""

    scale: str
    kind: ScaleKind
    activation: str | None = None
    zero_point: str | None = None

    @property
    def companions(self) -> list[str]:
        return [k for k in (self.scale, self.activation, self.zero_point) if k]


@dataclass
class NativeTensor:
    """One native tensor and the hf tensors it is made of.

    kind ``copy``: one part, same layout. ``transpose``: one aggregated expert part, last two dims swapped
    (``transpose2d``: a 2-D part, moved whole, operations.Transpose2d).
    ``concat``: aggregated expert parts, each transposed, concatenated on the last dim (operations.Concat).
    ``fp32``: one part, held in fp32 (operations.Fp32).
    ``split``: hf rows ``rows[0]:rows[1]`` of the one part (operations.Split); the others are siblings.
    ``unpad``: the first ``rows[0]`` of the one part's ``rows[1]`` entries along its last dim, in fp32
    (operations.Unpad).
    ``stack``: ``parts[e * len(names) + j]`` is expert ``e``'s part ``j``; slice ``e`` is ``cat(part.T)``.
    ``zeros``: injected by Recast (no parts); the way back drops it.
    """

    key: str
    kind: str
    parts: list[str]
    experts: int = 0
    names: int = 1
    rows: list[int] | None = None

    def part_of(self, e: int) -> list[str]:
        return self.parts[e * self.names : (e + 1) * self.names]


@dataclass
class KeyPlan:
    tensors: list[NativeTensor]
    quant: dict[str, Quant] = field(default_factory=dict)  # hf key -> its scales

    @property
    def injected(self) -> list[str]:
        return [t.key for t in self.tensors if t.kind == "zeros"]

    @property
    def passthrough(self) -> list[str]:
        """Keys no rule touched (copied under their own name): where a wrong adapter would show."""
        return [t.key for t in self.tensors if t.kind == "copy" and t.parts == [t.key]]

    def to_json(self) -> dict[str, Any]:
        return {
            "tensors": [
                {k: v for k, v in asdict(t).items() if k != "rows" or v is not None} for t in self.tensors
            ],
            "quant": {
                k: {"scale": q.scale, "kind": q.kind.value, "activation": q.activation}
                | ({"zero_point": q.zero_point} if q.zero_point else {})
                for k, q in self.quant.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyPlan:
        return cls(
            [NativeTensor(**t) for t in data["tensors"]],
            {
                k: Quant(v["scale"], ScaleKind(v["kind"]), v["activation"], v.get("zero_point"))
                for k, v in data["quant"].items()
            },
        )


# Rule kinds whose native tensor is one hf tensor, renamed by the rule (and reshaped or widened).
ONE_PART = ("transpose", "fp32", "copy", "squeeze")


def find_quant(
    tensors: dict[str, TensorInfo],
    fmt: QuantFormat = FP8_FORMAT,
    shards: Callable[[str], tuple[int, str]] | None = None,
) -> tuple[dict[str, Quant], list[str]]:
    """Pair every FP8 tensor with its scale (looked up across shards), named as ``fmt`` names them;
    error on a missing one, and on a companion that belongs to no quantized tensor. ``shards(key)``: how
    many row shards, each with a block grid of its own, a tensor is saved as, and where that count is
    read (``source_quant``)."""
    quant: dict[str, Quant] = {}
    companions: set[str] = set()
    for key, info in tensors.items():
        if fmt.companion_name(key):
            continue
        if key.endswith(fmt.scale_suffix):
            base = fmt.weight_key(key)
            if base not in tensors:
                raise CheckpointError(f"scale {key!r} (in {info.file}) has no weight {base!r}")
            continue
        scale = fmt.scale_key(key)
        if scale not in tensors and fmt.codes_scale_suffix and info.dtype == "U8":
            scale = key + fmt.codes_scale_suffix
        if scale in tensors:
            n, why = shards(key) if shards else (1, "")
            kind = (
                classify_sharded(key, info.shape, tensors[scale].shape, n, why)
                if n > 1
                else fmt.classify(key, info, tensors[scale])
            )
            activation = next((c for c in fmt.activation_keys(key) if c in tensors), None)
            zero_point = fmt.zero_point_key(key)
            q = Quant(scale, kind, activation, zero_point if zero_point in tensors else None)
            quant[key] = q
            companions.update(q.companions)
        elif (
            info.dtype in ("U8", "I8")
            and key.endswith(".weight")
            and (codes := key + FP8_FORMAT.codes_scale_suffix) in tensors
        ):
            raise CheckpointError(
                f"{key!r} in {info.file} is {info.dtype} with a scale {codes!r}: packed codes spelled as "
                f"the vendors' fp8 layout spells uint8 FP4 (MiMo-V2.6's experts), which the {fmt.name} layout, "
                "from config.json, does not read"
            )
        elif info.dtype.startswith("F8") or fmt.packed(key, info.dtype):
            raise CheckpointError(
                f"{key!r} in {info.file} is {info.dtype} but its scale {scale!r} is missing from the checkpoint"
                f" ({fmt.name} layout, from config.json)"
            )
    strays = [k for k in tensors if fmt.companion_name(k) and k not in companions]
    if strays:
        raise CheckpointError(f"{strays[0]!r} belongs to no quantized weight")
    return quant, sorted(companions)


def source_quant(ckpt: Checkpoint, fmt: QuantFormat | None = None) -> tuple[dict[str, Quant], list[str]]:
    """``find_quant`` of an hf checkpoint in the format it declares and spells (``qformat.source_format``, or
    ``fmt`` where the caller has it already), with the row shards of the family detection finds (how the
    checkpoint was saved, whatever the adapter)."""
    config, tensors = ckpt.config, ckpt.tensors
    fmt = fmt or source_format(config, tensors)
    # only families with sharded rules matter here, and detection reads every key: ask those alone
    sharded = [a for a in ADAPTERS.values() if any(r.shards for r in a.experts)]
    family = next((a for a in sharded if fits(a, config, list(tensors))), None) if config else None
    if family is None:
        return find_quant(tensors, fmt)
    metadata = ckpt.index_metadata

    def shards(key: str) -> tuple[int, str]:
        rule = family.shard_rule(key)
        return (rule.shard_count(config, metadata), rule.shards_from) if rule else (1, "")

    return find_quant(tensors, fmt, shards)


def _check_stackable(ckpt: Checkpoint, parts: list[str], names: int) -> None:
    """Experts stack into one ``[E, H, sum(w)]`` tensor only if every expert's parts are 2-D, part ``j``
    has one shape across experts and all parts share their second dimension; refuse anything else here,
    naming the tensor, before a byte is written."""
    first = [ckpt.tensors[k].shape for k in parts[:names]]
    for i, key in enumerate(parts):
        shape, want = ckpt.tensors[key].shape, first[i % names]
        if len(shape) != 2 or shape != want or shape[1] != first[0][1]:
            raise CheckpointError(
                f"{ckpt.tensors[key].file}: expert tensor {key!r} has shape {list(shape)}, but stacking "
                f"needs 2-D parts shaped like {parts[i % names]!r} {list(want)} with {first[0][1]} columns"
            )


def _check_concatenable(ckpt: Checkpoint, parts: list[str]) -> None:
    """Aggregated expert parts concatenate (and split back evenly) only if all are 3-D and one shape."""
    want = ckpt.tensors[parts[0]].shape
    for key in parts:
        shape = ckpt.tensors[key].shape
        if len(shape) != 3 or shape != want:
            raise CheckpointError(
                f"{ckpt.tensors[key].file}: expert tensor {key!r} has shape {list(shape)}, but concatenating "
                f"needs 3-D [experts, out, in] parts shaped like {parts[0]!r} {list(want)}"
            )


def _split_rows(
    rule: ExpertRule,
    config: dict[str, Any],
    key: str,
    sharded: bool,
    index_metadata: dict[str, Any] | None = None,
) -> tuple[list[int], dict[str, list[int]]]:
    """Each part's rows in ``key``, and each native piece's hf row ranges (``operations.Split``'s flat
    ``rows``) by its name: a part's, one range each or, ``sharded``, one in every shard the tensor is saved
    as (``ExpertRule.shards``: MiMo's FP8 release; NeMo's adapter takes a bf16 one, as its to_hf writes it,
    to be in part order already); a ``fused`` rule's one piece, all of them part by part."""
    sizes = rule.split_sizes(config, key)
    n = rule.shard_count(config, index_metadata) if sharded else 1
    if any(size % n for size in sizes):
        raise CheckpointError(
            f"{key!r}: config.json gives its parts {dict(zip(rule.parts, sizes, strict=True))} rows, which "
            f"do not divide among the {n} shards ({rule.shards_from}) it is saved as"
        )
    per = [size // n for size in sizes]
    parts = [
        [r for k in range(n) for r in (k * sum(per) + sum(per[:j]), k * sum(per) + sum(per[: j + 1]))]
        for j in range(len(per))
    ]
    if rule.fused:
        return sizes, {rule.fused: _merged([r for part in parts for r in part])}
    return sizes, {name: _merged(rows) for name, rows in zip(rule.parts, parts, strict=True)}


def _merged(rows: list[int]) -> list[int]:
    """Flat row ranges with each range that starts where the one before ends joined to it."""
    out: list[int] = []
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        if out and out[-1] == a:
            out[-1] = b
        else:
            out += [a, b]
    return out


def quantized_shards(adapter: Adapter, hf_key: str) -> ExpertRule | None:
    """The split rule of a tensor the family saves shard by shard only when it is quantized, if ``hf_key``
    is one: a bf16 one is in part order (MiMo-V2.5-Pro, as NeMo's adapter reads it)."""
    rule = adapter.shard_rule(hf_key)
    return rule if rule is not None and not rule.shards_unquantized else None


def unpacked_name(key: str, quant: dict[str, Quant], fmt: QuantFormat) -> str | None:
    """Where quantized ``key`` is codes stored under a name of their own in ``fmt`` (Kimi K3's
    ``K.weight_packed``, ``QuantFormat.unpacked_name``): the name of the weight it holds, which it goes out
    under when its codes are not kept. None for any other key, and for codes laid out as only their format
    holds them (``restore_only``), which keep their name."""
    q = quant.get(key)
    return fmt.unpacked_name(key) if q is not None and not q.kind.restore_only else None


def unpacked(plan: KeyPlan, fmt: QuantFormat) -> KeyPlan:
    """``plan`` with each part that ``unpacked_name`` renames so renamed, its recorded scale dropped: a way
    back that does not keep the codes writes that weight (bf16, or FP8 with fresh scales) under the weight's
    own name."""
    renamed = {k: n for k in plan.quant if (n := unpacked_name(k, plan.quant, fmt))}
    if not renamed:
        return plan
    tensors = [replace(t, parts=[renamed.get(p, p) for p in t.parts]) for t in plan.tensors]
    return KeyPlan(tensors, {k: q for k, q in plan.quant.items() if k not in renamed})


def as_unquantized(adapter: Adapter, config: dict[str, Any], t: NativeTensor) -> NativeTensor:
    """Split piece ``t`` with the rows it takes in an unquantized hf tensor: in part order where the family
    saves only quantized ones shard by shard (``quantized_shards``), so the way back writes it so whatever
    the recorded plan's FP8 source had."""
    rule = quantized_shards(adapter, t.parts[0]) if t.kind == "split" else None
    if rule is None:
        return t
    return replace(t, rows=_split_rows(rule, config, t.parts[0], False)[1][_split_part(t.key, rule)])


def _split(
    ckpt: Checkpoint, quant: dict[str, Quant], key: str, prefix: str, rule: ExpertRule
) -> list[NativeTensor]:
    """One native tensor per part of the split rule (or one for all, ``fused``), each rows of ``key``;
    refuse a tensor whose rows are not the sizes config.json gives, or block-FP8 split points off the
    scale blocks."""
    info = ckpt.tensors[key]
    sharded = key in quant or rule.shards_unquantized
    metadata = ckpt.index_metadata
    sizes, pieces = _split_rows(rule, ckpt.config, key, sharded, metadata)
    shape = value_shape(quant[key].kind, info.shape) if key in quant else info.shape
    if not shape or shape[0] != sum(sizes):
        n = rule.shard_count(ckpt.config, metadata) if sharded else 1
        shards = f" in {n} shards ({rule.shards_from})" if n > 1 else ""
        raise CheckpointError(
            f"{info.file}: {key!r} has shape {list(shape)}, but config.json splits it into "
            f"{dict(zip(rule.parts, sizes, strict=True))} = {sum(sizes)} rows ({', '.join(rule.sizes)}){shards}"
        )
    bounds = sorted({b for rows in pieces.values() for b in rows})
    q = quant.get(key)
    if q is not None and q.kind is ScaleKind.BLOCK and any(b % BLOCK for b in bounds):
        raise CheckpointError(
            f"{info.file}: {key!r} is block-scaled FP8 ({BLOCK} rows a scale), but config.json splits it "
            f"at rows {bounds[1:-1]}, inside a block: its scales cannot be split with it"
        )
    return [
        NativeTensor(prefix + rule.native + name, "split", [key], rows=rows) for name, rows in pieces.items()
    ]


def plan_from_hf(ckpt: Checkpoint, adapter: Adapter) -> KeyPlan:
    """Apply the adapter to an hf checkpoint's keys; refuse it if its rules do not fit them."""
    adapter.check_config(ckpt.config)
    plan = _hf_plan(ckpt, adapter)
    copied = [t.parts[0] for t in plan.tensors if t.kind == "copy"]
    _check_fit(ckpt, adapter, plan, copied, lambda other: _hf_plan(ckpt, other))
    return plan


def _hf_plan(ckpt: Checkpoint, adapter: Adapter) -> KeyPlan:
    fmt = source_format(ckpt.config, ckpt.tensors)
    quant, companions = source_quant(ckpt, fmt)
    skip = set(companions)
    out: list[NativeTensor] = []
    stacks: dict[tuple[str, int], dict[int, dict[str, str]]] = {}
    concats: dict[tuple[str, int], dict[str, str]] = {}
    for key in ckpt.tensors:
        if key in skip:
            continue
        name = unpacked_name(key, quant, fmt) or key  # Kimi K3's K.weight_packed holds the weight K.weight
        if adapter.passes(key):
            out.append(NativeTensor(name, "copy", [key]))
            continue
        renamed = adapter.to_native(name)
        matched = next(((i, m) for i, r in enumerate(adapter.experts) if (m := r.match_hf(renamed))), None)
        if matched is None:
            out.append(NativeTensor(renamed, "copy", [key]))
            continue
        idx, m = matched
        rule = adapter.experts[idx]
        if rule.kind == "stack":
            stacks.setdefault((m["prefix"], idx), {}).setdefault(int(m["e"]), {})[m["part"]] = key
        elif rule.kind == "concat":
            concats.setdefault((m["prefix"], idx), {})[m["part"]] = key
        elif rule.kind == "split":
            out.extend(_split(ckpt, quant, key, m["prefix"], rule))
        elif rule.kind == "unpad":  # the stored length is the tensor's own (NeMo reads any at least kept)
            kept, shape = rule.split_sizes(ckpt.config, key)[0], ckpt.tensors[key].shape
            out.append(
                NativeTensor(
                    m["prefix"] + rule.native, "unpad", [key], rows=[kept, shape[-1] if shape else 0]
                )
            )
        else:  # ONE_PART: one hf tensor, renamed by the rule
            out.append(
                NativeTensor(m["prefix"] + rule.native, _one_part_kind(rule, ckpt.tensors[key].shape), [key])
            )
    for (prefix, idx), experts in sorted(stacks.items()):
        rule = adapter.experts[idx]
        n = len(experts)
        parts = []
        for e in range(n):
            got = experts.get(e, {})
            missing = [p for p in rule.parts if p not in got]
            if missing:
                raise CheckpointError(
                    f"{prefix}{rule.hf.format(e=e)}: expert {e} of {n} lacks {missing} "
                    f"(experts must be numbered 0..{n - 1})"
                )
            parts.extend(got[p] for p in rule.parts)
        _check_stackable(ckpt, parts, len(rule.parts))
        out.append(NativeTensor(prefix + rule.native, "stack", parts, experts=n, names=len(rule.parts)))
    for (prefix, idx), got in sorted(concats.items()):
        rule = adapter.experts[idx]
        missing = [p for p in rule.parts if p not in got]
        if missing:
            raise CheckpointError(f"{prefix}{rule.hf}: has {sorted(got)} but lacks {missing}")
        parts = [got[p] for p in rule.parts]
        _check_concatenable(ckpt, parts)
        out.append(NativeTensor(prefix + rule.native, "concat", parts, names=len(parts)))
    if adapter.inject_gate_bias:
        native = {t.key for t in out}
        for t in list(out):
            if t.key.endswith("mlp.gate.weight"):
                bias = t.key[: -len("weight")] + "e_score_correction_bias"
                if bias not in native:
                    out.append(NativeTensor(bias, "zeros", [], experts=ckpt.tensors[t.parts[0]].shape[0]))
    _check_unique(out)
    return KeyPlan(out, quant)


def plan_from_native(ckpt: Checkpoint, adapter: Adapter) -> KeyPlan:
    """The way back: the recorded plan when Recast wrote this checkpoint, else the adapter inverted."""
    adapter.check_config(ckpt.config)
    recorded = (ckpt.sidecar or {}).get("plan")
    if recorded:
        plan = KeyPlan.from_json(recorded)
        missing = [t.key for t in plan.tensors if t.key not in ckpt.tensors]
        if missing:
            raise CheckpointError(f"native checkpoint lacks {missing[:3]} which its recast.json lists")
        _check_recorded_adapter(ckpt, adapter, plan)
        return plan
    plan = _native_plan(ckpt, adapter)
    copied = [t.key for t in plan.tensors if t.kind == "copy"]
    _check_fit(ckpt, adapter, plan, copied, lambda other: _native_plan(ckpt, other))
    return plan


def _native_plan(ckpt: Checkpoint, adapter: Adapter) -> KeyPlan:
    out: list[NativeTensor] = []
    for key, info in ckpt.tensors.items():
        if adapter.passes(key):
            out.append(NativeTensor(key, "copy", [key]))
            continue
        split = next((r for r in adapter.experts if r.kind == "split" and _split_part(key, r)), None)
        if split:
            part = _split_part(key, split)
            rows = _split_rows(split, ckpt.config, key, False)[1][part]
            want = sum(rows[1::2]) - sum(rows[::2])
            why = " + ".join(split.sizes) if split.fused else split.sizes[split.parts.index(part)]
            if not info.shape or info.shape[0] != want:
                raise CheckpointError(
                    f"{info.file}: {key!r} has shape {list(info.shape)}, but config.json gives it "
                    f"{want} rows ({why})"
                )
            hf = adapter.to_hf(key[: -len(split.native + part)] + split.hf)
            out.append(NativeTensor(key, "split", [hf], rows=rows))
            continue
        unpad = next((r for r in adapter.experts if r.kind == "unpad" and key.endswith(r.native)), None)
        if unpad:
            part = adapter.to_hf(key[: -len(unpad.native)] + unpad.hf)
            kept = info.shape[-1] if info.shape else 0
            out.append(NativeTensor(key, "unpad", [part], rows=[kept, unpad.padded(kept)]))
            continue
        stack = next((r for r in adapter.experts if r.kind == "stack" and key.endswith(r.native)), None)
        transpose = next(
            (r for r in adapter.experts if r.kind in ONE_PART and key.endswith(r.native)),
            None,
        )
        concat = next((r for r in adapter.experts if r.kind == "concat" and key.endswith(r.native)), None)
        if concat and len(info.shape) == 3:
            prefix = key[: -len(concat.native)]
            parts = [adapter.to_hf(prefix + concat.hf_part(0, p)) for p in concat.parts]
            out.append(NativeTensor(key, "concat", parts, names=len(parts)))
        elif stack and len(info.shape) == 3:
            prefix = key[: -len(stack.native)]
            parts = [
                adapter.to_hf(prefix + stack.hf_part(e, p)) for e in range(info.shape[0]) for p in stack.parts
            ]
            out.append(NativeTensor(key, "stack", parts, experts=info.shape[0], names=len(stack.parts)))
        elif transpose:
            part = adapter.to_hf(key[: -len(transpose.native)] + transpose.hf)
            out.append(NativeTensor(key, _one_part_kind(transpose, info.shape), [part]))
        else:
            out.append(NativeTensor(key, "copy", [adapter.to_hf(key)]))
    _check_unique(out)
    return KeyPlan(out, {})


def _one_part_kind(rule: ExpertRule, shape: tuple[int, ...]) -> str:
    """The kind of a one-part rule's tensor: a ``transpose`` of a 2-D tensor moves it whole
    (operations.Transpose2d); of experts, it streams by expert."""
    return "transpose2d" if rule.kind == "transpose" and len(shape) == 2 else rule.kind


def _split_part(key: str, rule: ExpertRule) -> str | None:
    """The part of a ``split`` rule that native ``key`` is (its ``fused`` name for a fused one), if any."""
    names = (rule.fused,) if rule.fused else rule.parts
    return next((p for p in names if key.endswith(rule.native + p)), None)


def _check_fit(
    ckpt: Checkpoint,
    adapter: Adapter,
    plan: KeyPlan,
    copied: list[str],
    replan: Callable[[Adapter], KeyPlan],
) -> None:
    """Refuse an adapter whose rules do not account for the checkpoint.

    Verification checks the output against this same plan, so it cannot see a wrong adapter. Two tests,
    both read from the adapters' data: no source key that any family's expert rules take may have been
    ``copied`` unchanged; and the adapter must be the one detection picks, a declared variant of it
    (``variant_of``), or plan exactly the output that one does (``mistral4-vlm`` on a Mistral 4 text
    checkpoint, say).
    """
    found = detected(ckpt.config, list(ckpt.tensors))
    left = sorted(k for k in copied if expert_owner(k) and not adapter.claims_expert(k))
    if left:
        family = (found or expert_owner(left[0])).name
        raise AdapterMismatchError(
            f"adapter {adapter.name!r} does not fit {ckpt.source.description}, which looks like {family}: "
            f"its rules leave {len(left)} expert tensors unconverted, e.g. {left[:3]}"
        )
    if found is None:
        raise AdapterMismatchError(
            f"adapter {adapter.name!r} does not fit {ckpt.source.description}: config.json "
            f"{describe_config(ckpt.config)} is not {adapter.description}; supported adapters: {supported()}"
        )
    if (
        found.name != adapter.name
        and adapter.variant_of != found.name
        and not _same_output(plan, adapter, replan(found), found)
    ):
        raise AdapterMismatchError(
            f"adapter {adapter.name!r} does not fit {ckpt.source.description}, which looks like "
            f"{found.name} (config.json {describe_config(ckpt.config)}): {adapter.name} would write "
            f"different tensors; leave the adapter unset or use {found.name!r}"
        )


def _same_output(plan: KeyPlan, adapter: Adapter, theirs: KeyPlan, other: Adapter) -> bool:
    """Whether ``other`` writes the same bytes as ``adapter``: the same plan and the same quantization."""
    return theirs.to_json() == plan.to_json() and _same_quantization(plan, adapter, other)


def _same_quantization(plan: KeyPlan, adapter: Adapter, other: Adapter) -> bool:
    """Whether a fresh quantization of the plan's hf tensors comes out the same under both adapters."""
    hf_keys = {p for t in plan.tensors for p in t.parts}
    return all(
        adapter.quantizable(k) == other.quantizable(k)
        and adapter.never_quantized_prefix(k) == other.never_quantized_prefix(k)
        for k in hf_keys
    )


def _check_recorded_adapter(ckpt: Checkpoint, adapter: Adapter, plan: KeyPlan) -> None:
    """An override must agree with the adapter recast.json records.

    The recorded plan fixes the tensors whatever the override; the adapter still decides what a fresh
    quantization does, so one that would decide differently conflicts with how the checkpoint was written.
    """
    name = ckpt.sidecar.get("adapter")
    written_with = ADAPTERS.get(name)
    if written_with is None or _same_quantization(plan, adapter, written_with):
        return
    raise AdapterMismatchError(
        f"{ckpt.source.description} was written with adapter {name!r} (its recast.json); adapter "
        f"{adapter.name!r} would quantize it differently; leave the adapter unset to use {name!r}"
    )


def _check_unique(tensors: list[NativeTensor]) -> None:
    seen: set[str] = set()
    for t in tensors:
        if t.key in seen:
            raise CheckpointError(f"two source tensors map to the same native key {t.key!r}")
        seen.add(t.key)
