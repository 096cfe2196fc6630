"""Reference semantics of the conversions, written plainly over whole state dicts.

This is the yardstick the engine is compared against bit for bit, so it is deliberately naive: the
whole checkpoint in memory, one obvious pass per rule of DESIGN.md sections 3 and 4, no streaming, no
work units, no cleverness. It must not import the engine (``worker.engine``); sharing code would let a
bug hide on both sides.

Forward (``hf_to_native``): dequantize every FP8 tensor in HF key space (fp32 multiply, then cast),
drop scale and activation-scale keys, rename keys, convert experts, inject missing gate biases.
Inverse (``native_to_hf_keep``): undo all of that with the source's own scales and spelling, so an
unmodified native dict comes back byte-identical to the source.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128

ADAPTERS: tuple[str, ...] = ("mistral4", "mistral4-vlm", "mistral3-fp8", "deepseek-v3")
_MISTRAL4 = ("mistral4", "mistral4-vlm")

NON_QUANTIZED_PATTERNS: tuple[str, ...] = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "norm.weight",
    "lm_head.weight",
    "embed_tokens.weight",
    "mlp.gate.weight",
)
NEVER_QUANTIZED_PREFIXES: tuple[str, ...] = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)

_GATE_BIAS = "mlp.gate.e_score_correction_bias"
_HF_GATE_UP, _HF_DOWN = ".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"
_NATIVE_GATE_UP, _NATIVE_DOWN = ".mlp.experts.gate_and_up_projs", ".mlp.experts.down_projs"
_DEEPSEEK_EXPERT = re.compile(
    r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$"
)


# --------------------------------------------------------------------------------------------------
# Key helpers
# --------------------------------------------------------------------------------------------------


def scale_key(key: str) -> str:
    """Every quantized key ``K`` has its dequant multiplier at ``K_scale_inv``."""
    return key + "_scale_inv"


def activation_scale_key(key: str) -> str:
    """``X.weight`` → ``X.activation_scale``; expert key ``K`` → ``K_activation_scale``."""
    if key.endswith(".weight"):
        return key[: -len(".weight")] + ".activation_scale"
    return key + "_activation_scale"


def is_quantizable_key(key: str) -> bool:
    """Whether a text-model key is stored as FP8 when a checkpoint is quantized (DESIGN §3)."""
    if key.startswith(NEVER_QUANTIZED_PREFIXES):
        return False
    if key.endswith((_HF_GATE_UP, _HF_DOWN)):
        return True
    return key.endswith(".weight") and not any(p in key for p in NON_QUANTIZED_PATTERNS)


def _side_keys(sd: dict[str, torch.Tensor]) -> set[str]:
    """Scale and activation-scale keys of the FP8 tensors in ``sd``."""
    side: set[str] = set()
    for key, t in sd.items():
        if t.dtype == FP8_DTYPE:
            if scale_key(key) not in sd:
                raise ValueError(f"{key}: FP8 tensor without its scale {scale_key(key)}")
            side.add(scale_key(key))
            if activation_scale_key(key) in sd:
                side.add(activation_scale_key(key))
    for key in sd:
        orphan = key.endswith(("_scale_inv", ".activation_scale", "_activation_scale")) and key not in side
        if orphan:
            raise ValueError(f"{key}: scale key whose weight is missing or not FP8")
    return side


def detect_layout(sd: dict[str, torch.Tensor], adapter: str) -> str:
    """mistral3-fp8: ``vlm_full`` when keys read ``language_model.*``, else identity (decided from keys)."""
    if adapter == "mistral3-fp8":
        return "vlm_full" if any(k.startswith("language_model.") for k in sd) else "identity"
    return "default"


def _swap_prefix(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def native_key(hf_key: str, adapter: str, layout: str) -> str:
    """Pure renaming of one HF key (expert tensors keep their HF suffix here)."""
    if adapter == "mistral4":
        return _swap_prefix(hf_key, (("language_model.", ""),))
    if adapter == "mistral4-vlm":
        # DESIGN 'Known disagreements': the head lives in the text backend (reference 003).
        return _swap_prefix(
            hf_key,
            (
                ("language_model.model.", "model.language_model.model."),
                ("language_model.lm_head.", "model.language_model.lm_head."),
                ("vision_tower.", "model.vision_tower."),
                ("multi_modal_projector.", "model.multi_modal_projector."),
            ),
        )
    if adapter == "mistral3-fp8" and layout == "vlm_full":
        if hf_key == "language_model.lm_head.weight":
            return "lm_head.weight"
        return _swap_prefix(
            hf_key,
            (
                ("language_model.model.", "model.language_model."),
                ("vision_tower.", "model.vision_tower."),
                ("multi_modal_projector.", "model.multi_modal_projector."),
            ),
        )
    return hf_key


def _check_adapter(adapter: str) -> None:
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; expected one of {ADAPTERS}")


def _n_routed_experts(config: dict[str, Any]) -> int:
    if "n_routed_experts" in config:
        return int(config["n_routed_experts"])
    text = config.get("text_config") or {}
    if "n_routed_experts" in text:
        return int(text["n_routed_experts"])
    raise ValueError("config has no n_routed_experts (top level or text_config)")


# --------------------------------------------------------------------------------------------------
# FP8 arithmetic
# --------------------------------------------------------------------------------------------------


def expand_scale(key: str, weight_shape: torch.Size | tuple[int, ...], scale: torch.Tensor) -> torch.Tensor:
    """The fp32 multiplier broadcastable to the weight, from the scale's on-disk shape (DESIGN §4)."""
    shape = tuple(weight_shape)
    s = scale.float()
    if s.numel() == 1:  # per-tensor: [], [1], [1, 1]
        return s.reshape(())
    squeezed = s.squeeze()
    if len(shape) == 3 and squeezed.ndim == 1 and squeezed.shape[0] == shape[0]:  # per-expert
        return squeezed.reshape(-1, 1, 1)
    if len(shape) in (2, 3) and s.ndim == len(shape):  # 128x128 blocks (per expert for 3-D)
        rows, cols = shape[-2:]
        blocks = (*shape[:-2], math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
        if tuple(s.shape) == blocks:
            full = s.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
            return full[..., :rows, :cols]
    raise ValueError(f"{key}: scale shape {tuple(scale.shape)} does not fit weight shape {shape}")


def dequantize(key: str, w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 multiply, then one cast (a bf16 multiply would change about a quarter of the bits)."""
    return (w.float() * expand_scale(key, w.shape, scale)).to(dtype)


def quantize_with_scale(key: str, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(w / s, ±448)`` cast to e4m3; with the recorded scale this restores the source bytes."""
    q = w.float() / expand_scale(key, w.shape, scale)
    return q.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _amax_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize_fresh(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh scales ``amax / 448`` (all-zero → 1): returns (fp8 weight, fp32 scale).

    Scale shapes: "per-tensor" → ``[]``; "per-expert" (3-D only) → ``[E, 1, 1]``; "block" →
    ``[ceil(R/128), ceil(C/128)]`` for 2-D, ``[E, ceil(R/128), ceil(C/128)]`` for 3-D.
    """
    w32 = w.float()
    if mode == "per-tensor":
        scale = _amax_scale(w32.abs().amax())
    elif mode == "per-expert":
        if w.ndim != 3:
            raise ValueError(f"per-expert quantization needs a 3-D weight, got shape {tuple(w.shape)}")
        scale = _amax_scale(w32.abs().amax(dim=(1, 2), keepdim=True))
    elif mode == "block":
        if w.ndim not in (2, 3):
            raise ValueError(f"block quantization needs a 2-D or 3-D weight, got shape {tuple(w.shape)}")
        rows, cols = w.shape[-2:]
        nr, nc = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
        lead = tuple(w.shape[:-2])
        padded = torch.zeros((*lead, nr * BLOCK, nc * BLOCK), dtype=torch.float32)
        padded[..., :rows, :cols] = w32.abs()
        scale = _amax_scale(padded.reshape(*lead, nr, BLOCK, nc, BLOCK).amax(dim=(-3, -1)))
    else:
        raise ValueError(f"unknown quantization mode {mode!r}; expected per-tensor, per-expert or block")
    scale = scale.to(torch.float32).contiguous()
    return quantize_with_scale("<fresh>", w, scale), scale


def quantize_state_dict(sd: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """HF bf16 → HF FP8 with fresh scales on the quantizable keys (no activation scales: dynamic).

    ``mode`` "per-expert" quantizes 3-D expert tensors per expert and 2-D weights per tensor.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if not is_quantizable_key(key):
            out[key] = t
            continue
        m = "per-tensor" if mode == "per-expert" and t.ndim != 3 else mode
        q, s = quantize_fresh(t, m)
        out[key] = q
        out[scale_key(key)] = s
    return out


# --------------------------------------------------------------------------------------------------
# Expert layouts
# --------------------------------------------------------------------------------------------------


def _stack_deepseek_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert gate/up/down → ``gate_and_up_projs [E,H,2I]`` and ``down_projs [E,I,H]``."""
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        m = _DEEPSEEK_EXPERT.match(key)
        if m is None:
            out[key] = t
            continue
        prefix = m["prefix"]
        if prefix not in groups:
            groups[prefix] = {}
            out[prefix + ".gate_and_up_projs"] = torch.empty(0)  # placeholders keep the key order
            out[prefix + ".down_projs"] = torch.empty(0)
        groups[prefix].setdefault(int(m["e"]), {})[m["proj"]] = t
    for prefix, experts in groups.items():
        n = len(experts)
        if sorted(experts) != list(range(n)):
            raise ValueError(f"{prefix}: expert indices {sorted(experts)} are not 0..{n - 1}")
        for e, projs in experts.items():
            if set(projs) != {"gate", "up", "down"}:
                raise ValueError(f"{prefix}.{e}: has {sorted(projs)}, needs gate, up and down")
        gate_up = [torch.cat((experts[e]["gate"].T, experts[e]["up"].T), dim=-1) for e in range(n)]
        out[prefix + ".gate_and_up_projs"] = torch.stack(gate_up).contiguous()
        out[prefix + ".down_projs"] = torch.stack([experts[e]["down"].T for e in range(n)]).contiguous()
    return out


def _split_deepseek_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``_stack_deepseek_experts``."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key.endswith(_NATIVE_GATE_UP):
            prefix = key[: -len(".gate_and_up_projs")]
            inter = t.shape[-1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :, :inter].T.contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, :, inter:].T.contiguous()
        elif key.endswith(_NATIVE_DOWN):
            prefix = key[: -len(".down_projs")]
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = t[e].T.contiguous()
        else:
            out[key] = t
    return out


def _transpose_aggregated(sd: dict[str, torch.Tensor], to_native: bool) -> dict[str, torch.Tensor]:
    """Mistral 4: ``gate_up_proj [E,2I,H]`` ↔ ``gate_and_up_projs [E,H,2I]``, ``down_proj`` ↔
    ``down_projs`` — a transpose of the last two dims either way."""
    pairs = ((_HF_GATE_UP, _NATIVE_GATE_UP), (_HF_DOWN, _NATIVE_DOWN))
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        new_key = key
        for hf_suffix, native_suffix in pairs:
            old, new = (hf_suffix, native_suffix) if to_native else (native_suffix, hf_suffix)
            if key.endswith(old):
                new_key = key[: -len(old)] + new
                t = t.transpose(-1, -2).contiguous()
                break
        out[new_key] = t
    return out


def _inject_gate_bias(sd: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """Zero ``e_score_correction_bias`` (fp32) beside each ``mlp.gate.weight`` that lacks one."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        out[key] = t
        if key.endswith(".mlp.gate.weight"):
            bias = key[: -len("weight")] + "e_score_correction_bias"
            if bias not in sd:
                out[bias] = torch.zeros(n_experts, dtype=torch.float32)
    return out


# --------------------------------------------------------------------------------------------------
# Whole conversions
# --------------------------------------------------------------------------------------------------


def hf_to_native(
    sd: dict[str, torch.Tensor], config: dict[str, Any], adapter: str, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """HF (FP8 or not) → native: dequantized FP8 tensors in ``dtype``, everything else unchanged."""
    _check_adapter(adapter)
    layout = detect_layout(sd, adapter)
    side = _side_keys(sd)
    renamed: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key in side:
            continue
        if t.dtype == FP8_DTYPE:
            t = dequantize(key, t, sd[scale_key(key)], dtype)
        new = native_key(key, adapter, layout)
        if new in renamed:
            raise ValueError(f"{key}: native key {new} already produced by another source key")
        renamed[new] = t
    if adapter == "deepseek-v3":
        return _stack_deepseek_experts(renamed)
    if adapter in _MISTRAL4:
        return _inject_gate_bias(_transpose_aggregated(renamed, to_native=True), _n_routed_experts(config))
    return renamed


def native_to_hf_keep(
    native: dict[str, torch.Tensor],
    source_sd: dict[str, torch.Tensor],
    config: dict[str, Any],
    adapter: str,
) -> dict[str, torch.Tensor]:
    """Native → HF with the source's scales and spelling: the exact inverse of ``hf_to_native``.

    Removes the injected gate biases, restores the HF expert layout, re-quantizes every tensor that is
    FP8 in the source with the source's own scale, casts the rest to the source dtype, and puts the
    source's scale and activation-scale tensors back. Keys come out in the source's order.
    """
    _check_adapter(adapter)
    layout = detect_layout(source_sd, adapter)
    side = _side_keys(source_sd)
    by_native = {native_key(k, adapter, layout): k for k in source_sd if k not in side}

    work = dict(native)
    if adapter in _MISTRAL4:
        injected = [k for k in work if k.endswith(_GATE_BIAS) and k not in by_native]
        for k in injected:
            del work[k]
        work = _transpose_aggregated(work, to_native=False)
    elif adapter == "deepseek-v3":
        work = _split_deepseek_experts(work)

    out: dict[str, torch.Tensor] = {}
    for nkey, t in work.items():
        if nkey not in by_native:
            raise KeyError(f"native key {nkey} has no counterpart in the source checkpoint")
        hkey = by_native[nkey]
        src = source_sd[hkey]
        if tuple(t.shape) != tuple(src.shape):
            raise ValueError(
                f"{nkey}: shape {tuple(t.shape)} does not match source {hkey} {tuple(src.shape)}"
            )
        if src.dtype == FP8_DTYPE:
            out[hkey] = quantize_with_scale(hkey, t, source_sd[scale_key(hkey)])
        else:
            out[hkey] = t.to(src.dtype)
    missing = [k for k in by_native.values() if k not in out]
    if missing:
        raise KeyError(f"source keys with no native counterpart: {missing[:5]}")
    for k in side:
        out[k] = source_sd[k]
    return {k: out[k] for k in source_sd}


def state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys where two state dicts differ in presence, dtype, shape or bytes (empty list: identical)."""
    diff = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            diff.append(k)
            continue
        xv = x.contiguous().reshape(-1).view(torch.uint8)
        yv = y.contiguous().reshape(-1).view(torch.uint8)
        if not torch.equal(xv, yv):
            diff.append(k)
    return diff
