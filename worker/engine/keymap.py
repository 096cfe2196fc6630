"""The key plan: which hf tensors make which native tensor, and through which reversible operation.

Built from an hf checkpoint's keys by applying an adapter, or read back from a native checkpoint's
sidecar (which keeps the source's exact spelling), or — for a native checkpoint Recast did not write —
derived from the native keys by inverting the adapter's rules. Every source key ends up accounted for.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .adapters import Adapter
from .checkpoint import Checkpoint
from .errors import CheckpointError
from .fp8 import ScaleKind, classify_scale
from .safetensors_io import TensorInfo

SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class Quant:
    """An hf tensor's FP8 companions: its scale and, for static activation schemes, an activation scale."""

    scale: str
    kind: ScaleKind
    activation: str | None = None


@dataclass
class NativeTensor:
    """One native tensor and the hf tensors it is made of.

    kind ``copy``: one part, same layout. ``transpose``: one aggregated expert part, last two dims swapped.
    ``stack``: ``parts[e * len(names) + j]`` is expert ``e``'s part ``j``; slice ``e`` is ``cat(part.T)``.
    ``zeros``: injected by Recast (no parts); the way back drops it.
    """

    key: str
    kind: str
    parts: list[str]
    experts: int = 0
    names: int = 1

    def part_of(self, e: int) -> list[str]:
        return self.parts[e * self.names : (e + 1) * self.names]


@dataclass
class KeyPlan:
    tensors: list[NativeTensor]
    quant: dict[str, Quant] = field(default_factory=dict)  # hf key -> its scales

    @property
    def injected(self) -> list[str]:
        return [t.key for t in self.tensors if t.kind == "zeros"]

    def to_json(self) -> dict[str, Any]:
        return {
            "tensors": [asdict(t) for t in self.tensors],
            "quant": {
                k: {"scale": q.scale, "kind": q.kind.value, "activation": q.activation}
                for k, q in self.quant.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyPlan:
        return cls(
            [NativeTensor(**t) for t in data["tensors"]],
            {k: Quant(v["scale"], ScaleKind(v["kind"]), v["activation"]) for k, v in data["quant"].items()},
        )


def find_quant(tensors: dict[str, TensorInfo]) -> tuple[dict[str, Quant], list[str]]:
    """Pair every FP8 tensor with its scale (looked up across shards); error on a missing one."""
    quant: dict[str, Quant] = {}
    companions: set[str] = set()
    for key, info in tensors.items():
        if key.endswith(SCALE_SUFFIX):
            base = key[: -len(SCALE_SUFFIX)]
            if base not in tensors:
                raise CheckpointError(f"scale {key!r} (in {info.file}) has no weight {base!r}")
            continue
        if key.endswith("activation_scale"):
            continue
        scale = key + SCALE_SUFFIX
        if scale in tensors:
            kind = classify_scale(key, info.shape, tensors[scale].shape)
            activation = _activation_key(key, tensors)
            quant[key] = Quant(scale, kind, activation)
            companions.update({scale, activation} - {None})
        elif info.dtype.startswith("F8"):
            raise CheckpointError(
                f"{key!r} in {info.file} is {info.dtype} but its scale {scale!r} is missing from the checkpoint"
            )
    strays = [k for k in tensors if k.endswith("activation_scale") and k not in companions]
    if strays:
        raise CheckpointError(f"activation scale {strays[0]!r} belongs to no quantized weight")
    return quant, sorted(companions)


def _activation_key(key: str, tensors: dict[str, TensorInfo]) -> str | None:
    candidates = [key + "_activation_scale"]
    if key.endswith(".weight"):
        candidates.insert(0, key[: -len(".weight")] + ".activation_scale")
    return next((c for c in candidates if c in tensors), None)


_STACK = re.compile(r"^(?P<prefix>.*\.)mlp\.experts\.(?P<e>\d+)\.(?P<part>[a-z_]+)\.weight$")


def plan_from_hf(ckpt: Checkpoint, adapter: Adapter) -> KeyPlan:
    """Apply the adapter to an hf checkpoint's keys."""
    quant, companions = find_quant(ckpt.tensors)
    skip = set(companions)
    out: list[NativeTensor] = []
    stacks: dict[tuple[str, int], dict[int, dict[str, str]]] = {}
    for key in ckpt.tensors:
        if key in skip:
            continue
        renamed = adapter.to_native(key)
        m = _STACK.match(renamed)
        rules = [r for r in adapter.experts if r.kind == "stack" and m and m["part"] in r.parts]
        if rules:
            stacks.setdefault((m["prefix"], adapter.experts.index(rules[0])), {}).setdefault(int(m["e"]), {})[
                m["part"]
            ] = key
            continue
        rule = next((r for r in adapter.experts if r.kind == "transpose" and renamed.endswith(r.hf)), None)
        if rule:
            out.append(NativeTensor(renamed[: -len(rule.hf)] + rule.native, "transpose", [key]))
        else:
            out.append(NativeTensor(renamed, "copy", [key]))
    for (prefix, idx), experts in sorted(stacks.items()):
        rule = adapter.experts[idx]
        n = len(experts)
        parts = []
        for e in range(n):
            got = experts.get(e, {})
            missing = [p for p in rule.parts if p not in got]
            if missing:
                raise CheckpointError(
                    f"{prefix}mlp.experts: expert {e} of {n} lacks {missing} (experts must be numbered 0..{n - 1})"
                )
            parts.extend(got[p] for p in rule.parts)
        out.append(NativeTensor(prefix + rule.native, "stack", parts, experts=n, names=len(rule.parts)))
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
    recorded = (ckpt.sidecar or {}).get("plan")
    if recorded:
        plan = KeyPlan.from_json(recorded)
        missing = [t.key for t in plan.tensors if t.key not in ckpt.tensors]
        if not missing:
            return plan
        raise CheckpointError(f"native checkpoint lacks {missing[:3]} which its recast.json lists")
    out: list[NativeTensor] = []
    for key, info in ckpt.tensors.items():
        stack = next((r for r in adapter.experts if r.kind == "stack" and key.endswith(r.native)), None)
        transpose = next(
            (r for r in adapter.experts if r.kind == "transpose" and key.endswith(r.native)), None
        )
        if stack and len(info.shape) == 3:
            prefix = adapter.to_hf(key[: -len(stack.native)])
            parts = [f"{prefix}mlp.experts.{e}.{p}.weight" for e in range(info.shape[0]) for p in stack.parts]
            out.append(NativeTensor(key, "stack", parts, experts=info.shape[0], names=len(stack.parts)))
        elif transpose:
            out.append(
                NativeTensor(key, "transpose", [adapter.to_hf(key[: -len(transpose.native)]) + transpose.hf])
            )
        else:
            out.append(NativeTensor(key, "copy", [adapter.to_hf(key)]))
    _check_unique(out)
    return KeyPlan(out, {})


def _check_unique(tensors: list[NativeTensor]) -> None:
    seen: set[str] = set()
    for t in tensors:
        if t.key in seen:
            raise CheckpointError(f"two source tensors map to the same native key {t.key!r}")
        seen.add(t.key)
