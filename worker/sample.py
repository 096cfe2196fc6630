"""``recast sample``: a small FP8 checkpoint to try Recast on, made here with random weights.

Trying a converter should not start with a 200 GB download, so this writes a few MiB in the layout the
vendors publish and the engine converts: a DeepSeek-V3-shaped model with 128x128 block scales (the
DeepSeek-V3/R1 release format) or a Mistral-4-shaped one with per-tensor scales, static activation
scales and aggregated 3-D experts. The tensors are written directly with torch and safetensors, key by
key (transformers is a test-only dependency); which tensors are FP8 is the engine's own adapter rule,
so the sample is exactly what ``recast convert`` expects. The weights are random: the model converts and
round-trips byte for byte, but it does not generate text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from worker.engine.adapters import ADAPTERS
from worker.engine.errors import RecastError

FAMILIES = ("deepseek-v3", "mistral4")
FP8_MAX = 448.0
BLOCK = 128
SHARDS = 2
INDEX = "model.safetensors.index.json"

# Real configs shrunk: MLA attention, one dense layer then mixture-of-experts layers. Some widths are
# not multiples of 128, so block scales have partial edge blocks, as real checkpoints do.
_DIMS: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 320,
    "intermediate_size": 704,
    "moe_intermediate_size": 192,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 192,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 0,
    "eos_token_id": 1,
}
_CONFIG: dict[str, dict[str, Any]] = {
    "deepseek-v3": {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                    "routed_scaling_factor": 2.5, "rope_theta": 10000.0},
    "mistral4": {"architectures": ["Mistral4ForCausalLM"], "model_type": "mistral4",
                 "routed_scaling_factor": 1.0, "rope_theta": 10000.0},
}  # fmt: skip


def _shapes(family: str) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every tensor of the model in bf16 (the router bias in fp32, as DeepSeek ships it), in module order."""
    d = _DIMS
    h, heads = d["hidden_size"], d["num_attention_heads"]
    qk = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
    bf16 = torch.bfloat16
    yield "model.embed_tokens.weight", (d["vocab_size"], h), bf16
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,), bf16
        yield p + "self_attn.q_a_proj.weight", (d["q_lora_rank"], h), bf16
        yield p + "self_attn.q_a_layernorm.weight", (d["q_lora_rank"],), bf16
        yield p + "self_attn.q_b_proj.weight", (heads * qk, d["q_lora_rank"]), bf16
        yield p + "self_attn.kv_a_proj_with_mqa.weight", (d["kv_lora_rank"] + d["qk_rope_head_dim"], h), bf16
        yield p + "self_attn.kv_a_layernorm.weight", (d["kv_lora_rank"],), bf16
        kv_b = heads * (d["qk_nope_head_dim"] + d["v_head_dim"])
        yield p + "self_attn.kv_b_proj.weight", (kv_b, d["kv_lora_rank"]), bf16
        yield p + "self_attn.o_proj.weight", (h, heads * d["v_head_dim"]), bf16
        yield p + "post_attention_layernorm.weight", (h,), bf16
        if i < d["first_k_dense_replace"]:
            inter = d["intermediate_size"]
            yield from _mlp(p + "mlp.", h, inter)
            continue
        experts, inter = d["n_routed_experts"], d["moe_intermediate_size"]
        yield p + "mlp.gate.weight", (experts, h), bf16
        if family == "deepseek-v3":
            yield p + "mlp.gate.e_score_correction_bias", (experts,), torch.float32
            for e in range(experts):
                yield from _mlp(f"{p}mlp.experts.{e}.", h, inter)
        else:
            yield p + "mlp.experts.gate_up_proj", (experts, 2 * inter, h), bf16
            yield p + "mlp.experts.down_proj", (experts, h, inter), bf16
        yield from _mlp(p + "mlp.shared_experts.", h, inter * d["n_shared_experts"])
    yield "model.norm.weight", (h,), bf16
    yield "lm_head.weight", (d["vocab_size"], h), bf16


def _mlp(prefix: str, hidden: int, inter: int) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
    yield prefix + "gate_proj.weight", (inter, hidden), torch.bfloat16
    yield prefix + "up_proj.weight", (inter, hidden), torch.bfloat16
    yield prefix + "down_proj.weight", (hidden, inter), torch.bfloat16


def _scale_for(w: torch.Tensor, block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale as stored, scale expanded to the weight's shape): amax / 448 per tensor or per 128x128
    block, 1 where everything is zero. The scale is the dequantization multiplier (``*_scale_inv``)."""
    if not block:
        amax = w.abs().amax()
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).reshape(1)
        return scale, scale
    rows, cols = w.shape[-2:]
    nr, nc = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    padded = torch.zeros(nr * BLOCK, nc * BLOCK)
    padded[:rows, :cols] = w.abs()
    amax = padded.reshape(nr, BLOCK, nc, BLOCK).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return scale, full


def _tensors(family: str, seed: int) -> dict[str, torch.Tensor]:
    """The vendor state dict: FP8 weights each followed by its scale (and, for Mistral 4, its static
    activation scale); everything else as the shapes say."""
    adapter = ADAPTERS[family]
    block = family == "deepseek-v3"
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape, dtype in _shapes(family):
        values = torch.randn(shape, generator=gen) * 0.02
        if len(shape) == 1:  # norms near 1, the router bias near 0
            values = values + (0.0 if key.endswith("bias") else 1.0)
        w = values.to(dtype)
        if not adapter.quantizable(key):
            out[key] = w
            continue
        scale, full = _scale_for(w.float(), block)
        out[key] = (w.float() / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out[key + "_scale_inv"] = scale.to(torch.float32)
        if not block:
            act = (
                key.removesuffix(".weight") + ".activation_scale"
                if key.endswith(".weight")
                else key + "_activation_scale"
            )
            out[act] = (torch.rand(1, generator=gen) * 0.05 + 0.01).to(torch.float32)
    return out


def _config(family: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    block = family == "deepseek-v3"
    not_converted = sorted(
        k[: -len(".weight")] for k, t in tensors.items() if k.endswith(".weight") and t.ndim == 2
        and t.dtype != torch.float8_e4m3fn
    )  # fmt: skip
    quant = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic" if block else "static",
        "weight_block_size": [BLOCK, BLOCK] if block else None,
        "modules_to_not_convert": not_converted,
    }
    return {**_DIMS, **_CONFIG[family], "torch_dtype": "bfloat16", "quantization_config": quant}


def write_sample(dst: Path, family: str = "deepseek-v3", seed: int = 0) -> dict[str, Any]:
    """Write the sample into ``dst`` (new or empty) and return what was written: family, files, bytes."""
    if family not in FAMILIES:
        raise RecastError(f"--family: expected one of {', '.join(FAMILIES)}, got {family!r}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise RecastError(f"{dst}: already exists and is not an empty directory; choose a new one")
    tensors = _tensors(family, seed)
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    total = sum(sizes.values())
    # Contiguous shards of about equal size, each scale in its weight's shard, as save_pretrained does
    # (the scales follow their weight in ``tensors``).
    names = [f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors" for i in range(SHARDS)]
    weight_map: dict[str, str] = {}
    shard, done = names[0], 0
    for key in tensors:
        if not key.endswith(("_scale_inv", "activation_scale")):
            shard = names[min(SHARDS - 1, done * SHARDS // total)]
        weight_map[key] = shard
        done += sizes[key]
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        part = {k: t.contiguous() for k, t in tensors.items() if weight_map[k] == name}
        save_file(part, str(dst / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (dst / "config.json").write_text(json.dumps(_config(family, tensors), indent=2) + "\n")
    generation = {"bos_token_id": _DIMS["bos_token_id"], "eos_token_id": _DIMS["eos_token_id"]}
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (dst / "README.md").write_text(
        f"# Recast sample ({family})\n\nRandom weights in the vendor FP8 layout, written by `recast sample` "
        "to try conversions on. It converts and round-trips like a real checkpoint; it does not generate "
        "text.\n"
    )
    return {
        "family": family,
        "path": str(dst),
        "files": len(names) + 4,
        "tensors": len(tensors),
        "bytes": total,
    }
