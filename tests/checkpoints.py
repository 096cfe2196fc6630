"""Build real, vendor-style FP8 checkpoints for the tests.

Every checkpoint starts from one of transformers' own model classes with a tiny config, saved with
``save_pretrained`` so that key spelling and ``config.json`` are exactly what transformers writes. The
saved state dict is then re-written the way vendors publish FP8 models: quantized text weights with
``*_scale_inv`` siblings (and activation scales for static schemes), several shards, an index, and the
non-weight files a conversion must carry over.

The shapes are chosen to hit the edge cases of DESIGN.md section 4: dimensions that are not multiples
of 128 and some above 128 (partial edge blocks), 2-D weights with at most 128 rows (the ``[1, N]``
block-scale case), an all-zero 128x128 block and an all-zero expert (scale 1). Every constant-valued
tensor (norms, biases) is replaced by random values so that a swapped or lost key cannot go unnoticed.

Plain functions, no pytest fixtures: the test suite wraps them as it likes.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from reference import NEVER_QUANTIZED_PREFIXES, activation_scale_key, scale_key
from reference import is_quantizable_key as is_quantizable
from safetensors.torch import load_file, save_file

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128

SCHEMES: tuple[str, ...] = (
    "per-tensor", "per-expert", "per-channel", "block", "mxfp4", "mxfp8", "fp8-v4", "fp8-v4-base", "fp8-v41",
    "fp8-mxfp4", "mxfp4-ct",
)  # fmt: skip
# Per-expert scales only exist for the aggregated 3-D expert tensors of Mistral 4.
_PER_EXPERT_FAMILIES = ("mistral4", "mistral4-vlm")
# MXFP4 (blocks of 32 e2m1 values with e8m0 exponents): gpt-oss's experts, and only those.
_MXFP4_FAMILIES = ("gpt-oss",)
# MXFP8 (e4m3 codes with one e8m0 exponent per 32 columns of a row): MiniMax-M3's release format.
_MXFP8_FAMILIES = ("minimax-m3",)
# DeepSeek-V4's release formats (e8m0 128x128 block scales spelled ``.scale``; routed experts FP4 in
# V4-Flash, ``fp8-v4``, or e4m3 with those block scales in V4-Flash-Base, ``fp8-v4-base``): its only.
_V4_FAMILIES = ("deepseek-v4",)
# DeepSeek-V4.1's (``fp8-v41``): e8m0 scales per 32x32 block, FP4 routed experts, e8m0 per 32 columns of a
# row on the Engram tables.
_V41_FAMILIES = ("deepseek-v4.1",)
# MiMo-V2.6's (``fp8-mxfp4``): block FP8 with uint8 FP4 routed experts beside, K.weight with K.weight_scale.
_V26_FAMILIES = ("mimo-v2",)
# Kimi K3's (``mxfp4-ct``): bf16 with MXFP4 routed experts in compressed-tensors' mxfp4-pack-quantized spelling.
_K3_FAMILIES = ("kimi-k3",)


# Tiny but edge-case-rich dimensions: hidden 160 and dense width 200 give partial 128-blocks on both
# axes; q_lora 96, kv_lora 64, expert width 96 give weights with <= 128 rows ([1, N] block scales).
TINY_MOE_TEXT: dict[str, Any] = {
    "vocab_size": 300,
    "hidden_size": 160,
    "intermediate_size": 200,
    "moe_intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "n_shared_experts": 1,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 64,
    "q_lora_rank": 96,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
}
TINY_MINISTRAL3_TEXT: dict[str, Any] = {
    "vocab_size": 300,
    "hidden_size": 160,
    "intermediate_size": 200,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 40,
}
TINY_SIGLIP: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
}
TINY_PIXTRAL: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "head_dim": 16,
    "image_size": 64,
    "patch_size": 16,
}


@dataclass(frozen=True)
class TinyFamily:
    """A family whose vendor checkpoint is one transformers class with a tiny config (the newer ones).

    ``keep`` names weights the vendor leaves in bf16 beyond ``reference.NON_QUANTIZED_PATTERNS`` (the
    patterns of the family's NeMo adapter, e.g. DeepSeek-V3.2's indexer ``weights_proj``).
    """

    model: str
    config: dict[str, Any]
    keep: tuple[str, ...] = ()
    model_type: str | None = None  # config.json's, where the vendor's differs from the class's own
    # A text-only release saved from a VLM class: only ``model.`` / ``lm_head.`` keys kept, config.json
    # its text_config with this architecture (Step-3.5: transformers has only the Step-3.7 VLM class).
    text_only: str | None = None
    # Key endings the vendor stores in fp32 (Qwen3.5's GatedDeltaNet A_log and norm).
    fp32: tuple[str, ...] = ()
    # Key endings whose last two dims the published layout has the other way round from what this
    # transformers version saves (Qwen3-VL-MoE's aggregated experts: [E, H, 2I] on the Hub).
    hub_transpose: tuple[str, ...] = ()
    # The release's own spelling of the saved state dict and config.json, where transformers has no class
    # of the family and the checkpoint is a related class's re-spelled (Ling 2.0 from GLM-4.5-MoE).
    respell: Callable[[dict[str, torch.Tensor], dict[str, Any]], tuple[dict, dict]] | None = None
    # A key ending the vendor saves as ``n`` tensor-parallel row shards, each with a 128x128 block grid of
    # its own (MiMo-V2.5-Pro's fused qkv_proj), and that ``n``.
    row_shards: tuple[str, int] | None = None
    # Fields the vendor writes into model.safetensors.index.json's metadata (MiMo-V2.5's tp_size).
    index_metadata: dict[str, Any] = field(default_factory=dict)


# Two layers (the first dense where the family has dense layers), four experts, widths 160 / 200 / 96
# and head dims 40 / 32: partial 128-blocks on both axes and 2-D weights with <= 128 rows.
_TINY_DENSE: dict[str, Any] = {**TINY_MINISTRAL3_TEXT, "num_attention_heads": 2, "num_key_value_heads": 1}
_TINY_MOE: dict[str, Any] = {
    **_TINY_DENSE,
    "moe_intermediate_size": 96,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
}
# What Kimi's releases leave in bf16 beyond the norms and routers: the short convolutions, the KDA gates.
_KIMI_KEEP = ("conv1d.", *(f"self_attn.{p}_proj." for p in ("b", "f_a", "f_b", "g_a", "g_b")))
# Kimi Linear: layer 0 KDA with a dense MLP, layer 1 MLA with experts, layer 2 KDA with experts.
_TINY_KIMI_LINEAR: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 160,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": None,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "linear_attn_config": {
        "kda_layers": [1, 3],
        "full_attn_layers": [2],
        "head_dim": 32,
        "num_heads": 4,
        "short_conv_kernel_size": 4,
    },
    "first_k_dense_replace": 1,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# MiMo: two key/value heads (so two tensor-parallel shards of its fused qkv_proj), v_head_dim of its own.
_TINY_MIMO: dict[str, Any] = {
    **_TINY_MOE,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "n_routed_experts": 4,
    "v_head_dim": 32,
    "mlp_layer_types": ["dense", "sparse"],
}
# DeepSeek-V4: one layer of each attention kind (sliding, compressed sparse with its indexer, heavily
# compressed), layer 0 hash-routed (no router bias, a token-to-expert table); hidden 160 and expert
# width 96 (multiples of 32, for FP4) leave partial 128-blocks on the FP8 weights.
_TINY_V4: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 160,
    "moe_intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "head_dim": 64,
    "q_lora_rank": 96,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "o_groups": 2,
    "o_lora_rank": 64,
    "index_n_heads": 2,
    "index_head_dim": 32,
    "index_topk": 4,
    "num_nextn_predict_layers": 0,
    "hc_mult": 2,
    "partial_rotary_factor": 0.5,
    "layer_types": [
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
    ],
    "mlp_layer_types": ["hash_moe", "moe", "moe"],
}
_TINY_MLA: dict[str, Any] = {
    **{k: v for k, v in TINY_MOE_TEXT.items() if k != "first_k_dense_replace"},
    "num_hidden_layers": 2,
    "mlp_layer_types": ["dense", "sparse"],
}
_TINY_INDEXER: dict[str, Any] = {"index_n_heads": 2, "index_head_dim": 32, "index_topk": 4}
# Step-3.7: layer 0 dense, layer 1 MoE; text widths as _TINY_DENSE, a one-block vision tower.
_TINY_STEP: dict[str, Any] = {
    "text_config": {
        **_TINY_DENSE,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 96,
        "share_expert_dim": 96,
        "num_sliding_attention_heads": 2,
        "query_pre_attn_scalar": 40,
        "mlp_layer_types": ["dense", "sparse"],
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
    },
}
# Qwen3.5-MoE: layer 0 GatedDeltaNet (linear attention), layer 1 full attention; both MoE.
_TINY_QWEN3_5_TEXT: dict[str, Any] = {
    **_TINY_MOE,
    "num_experts": 4,
    "shared_expert_intermediate_size": 96,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 2,
    "layer_types": ["linear_attention", "full_attention"],
}
# The smallest vision tower the Qwen3.5 and Qwen3-VL classes build.
_TINY_QWEN_VISION: dict[str, Any] = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 160,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
_TINY_QWEN3_5: dict[str, Any] = {
    "text_config": _TINY_QWEN3_5_TEXT,
    "vision_config": _TINY_QWEN_VISION,
}
# What the Qwen3.5-MoE fixture's vendor leaves in bf16 beyond norms and routers.
_QWEN3_5_KEEP = (
    "shared_expert_gate.weight",
    "conv1d.weight",
    "in_proj_a.weight",
    "in_proj_b.weight",
    "visual.",
)
# GLM-5.3-Flash: layer 0 KDA linear attention with a dense MLP, layer 1 DSA (MLA + indexer) with experts.
_TINY_GLM5_NEXT: dict[str, Any] = {
    "text_config": {
        **{k: v for k, v in _TINY_MLA.items() if k != "mlp_layer_types"},
        "qk_head_dim": 32,
        "qk_rope_head_dim": 0,
        "index_topk": 16,
        "index_kpool": 4,
        "index_head_dim": 32,
        "index_n_heads": 2,
        "linear_head_dim": 32,
        "linear_num_heads": 2,
        "hc_mult": 2,
        "pad_token_id": 0,
        "mlp_layer_types": ["dense", "sparse"],
        "layer_types": ["linear_attention", "indexed_attention"],
        "indexer_types": ["full", "full"],
    },
    "vision_config": {
        "depth": 1,
        "hidden_size": 32,
        "num_heads": 2,
        "image_size": 56,
        "patch_size": 14,
        "out_hidden_size": 160,
        "intermediate_size": 64,
        "projection_intermediate_size": 64,
    },
}
# What NeMo's adapter says the release quantizes: MLA projections, MLPs, experts, o_proj of DSA layers.
_GLM5_NEXT_KEEP = (
    *(f"self_attn.{p}_proj." for p in ("b", "f_a", "f_b", "g_a", "g_b", "k", "q", "v")),
    "layers.0.self_attn.o_proj.",
    "conv1d.",
    "indexer.",
    "kv_b_proj.",
    "visual.",
)
_STEP_KEEP = ("moe.gate.weight", "vision_model.", "vit_large_projector.")


# Qwen3-Omni's talker and its code predictor: one small layer each.
_TINY_SPEECH: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
}


def _as_deepseek_v4(sd: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[dict, dict]:
    """transformers' DeepSeek-V4 save re-spelled as the release names it (DeepSeek's inference module tree,
    which transformers' own conversion mapping reads): no ``model.`` prefix, ``embed``, ``hc_head_*``; the
    router bias fp32 and the hash table int32, as released; and one MTP layer ``mtp.0.`` (transformers
    saves none): the last layer's tensors with the MTP block's own projections, norms and HC head."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        key = key.removeprefix("model.").replace("embed_tokens.", "embed.")
        key = key.replace("hc_head.hc_", "hc_head_")
        if key.endswith("ffn.gate.bias"):
            t = t.float()
        if key.endswith("ffn.gate.tid2eid"):
            t = t.to(torch.int32)
        out[key] = t
    last = f"layers.{config['num_hidden_layers'] - 1}."
    hidden = config["hidden_size"]
    gen = torch.Generator().manual_seed(7)
    mtp = {"mtp.0." + k[len(last) :]: t.clone() for k, t in out.items() if k.startswith(last)}
    for name, shape in (("e_proj.weight", (hidden, hidden)), ("h_proj.weight", (hidden, hidden))):
        mtp[f"mtp.0.{name}"] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    for name in ("enorm.weight", "hnorm.weight", "norm.weight"):
        mtp[f"mtp.0.{name}"] = (1 + torch.randn(hidden, generator=gen) * 0.05).to(torch.bfloat16)
    for part in ("fn", "base", "scale"):
        mtp[f"mtp.0.hc_head_{part}"] = out[f"hc_head_{part}"].clone()
    return {**out, **mtp}, {**config, "num_nextn_predict_layers": 1}


# MiMo-V2.5-Pro's sliding-window layers have head counts and dims of their own (hybrid_layer_pattern 1).
_MIMO_SWA = {
    "swa_num_attention_heads": 8,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 24,
    "swa_v_head_dim": 16,
}


def _as_mimo_v25(
    sd: dict[str, torch.Tensor], config: dict[str, Any], architecture: str = "MiMoV25ForCausalLM"
) -> tuple[dict, dict]:
    """transformers' MiMo-V2-Flash save re-spelled as a MiMo-V2.5-Pro release, by the layout NeMo's mimo_v25
    adapter documents: each layer's q/k/v fused into ``self_attn.qkv_proj.weight`` saved as one shard per
    key/value head, ``[Q_0 | K_0 | V_0 | Q_1 | …]``, sized by the full-attention head counts, or the
    ``swa_*`` ones on sliding-window layers (``hybrid_layer_pattern`` 1, from transformers' layer_types).
    The q/k/v are drawn afresh: transformers' class sizes its sliding-window layers its own way."""
    c = {**config, **_MIMO_SWA}
    tp, hidden = c["num_key_value_heads"], c["hidden_size"]
    pattern = [int(t == "sliding_attention") for t in c["layer_types"]]
    gen = torch.Generator().manual_seed(11)
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            continue
        if not key.endswith("self_attn.q_proj.weight"):
            out[key] = t
            continue
        swa = "swa_" if pattern[int(key.split(".layers.")[1].split(".")[0])] else ""
        heads, kv = c[swa + "num_attention_heads"], c[swa + "num_key_value_heads"]
        rows = (heads * c[swa + "head_dim"], kv * c[swa + "head_dim"], kv * c[swa + "v_head_dim"])
        parts = [(torch.randn(r, hidden, generator=gen) * 0.02).to(t.dtype) for r in rows]
        shards = [torch.cat([p.chunk(tp)[s] for p in parts]) for s in range(tp)]
        out[key[: -len("q_proj.weight")] + "qkv_proj.weight"] = torch.cat(shards)
    return out, {
        **c,
        "architectures": [architecture],
        "model_type": "mimo_v2",
        "attention_projection_layout": "fused_qkv",
        "hybrid_layer_pattern": pattern,
    }


def _as_deepseek_v41(sd: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[dict, dict]:
    """DeepSeek-V4's release re-spelled as a V4.1 one (transformers has no V4.1 class; NeMo's adapter
    documents the names): V4's module tree, one MTP (DSpark draft) layer, and on layer 1 an Engram, its
    table of 70 rows and its projection drawn here, and a vision-language router bias ``bias_vl``;
    config.json nests the text model as V4.1's does."""
    out, config = _as_deepseek_v4(sd, config)
    gen = torch.Generator().manual_seed(13)
    rows, channels, hidden = 70, 256, config["hidden_size"]
    for name, shape in (("embed.weight", (rows, channels)), ("wkv.weight", (hidden, channels))):
        out[f"layers.1.engram.{name}"] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    out["layers.1.engram.norm.weight"] = (1 + torch.randn(channels, generator=gen) * 0.05).to(torch.bfloat16)
    # the vision-language router's bias beside the text one (NeMo keeps its name: not a ".ffn.gate.bias")
    out["layers.1.ffn.gate.bias_vl"] = torch.randn(config["n_routed_experts"], generator=gen)
    v4_only = ("architectures", "transformers_version", "layer_types", "mlp_layer_types")
    text = {k: v for k, v in config.items() if k not in v4_only}
    text |= {"model_type": "deepseek_v41_text", "engram_layer_ids": [1], "engram_num_embeddings": [rows]}
    return out, {
        "architectures": ["DeepseekV41ForCausalLM"],
        "model_type": "deepseek_v41",
        "text_config": text,
        "transformers_version": config.get("transformers_version"),
    }


def _as_kimi_linear(sd: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[dict, dict]:
    """transformers 5.24 saves Kimi Linear's dense MLP under ``block_sparse_moe.`` (it reverses its load
    rename on every key); the release names it ``mlp.``, as its own modeling code does."""
    dense = re.compile(r"\.block_sparse_moe\.((?:gate|up|down)_proj\.weight)$")
    return {dense.sub(r".mlp.\1", k): t for k, t in sd.items()}, config


# Kimi K3's routed experts work in a latent width of their own (routed_expert_hidden_size); 96 is a
# multiple of 32 (MXFP4 groups) and not the hidden 160, so a swapped dimension shows.
_K3_LATENT = 96
# What Kimi K3 stores padded: the KDA A_log, 128 entries (NeMo's _pad_checkpoint_a_log).
_K3_A_LOG = 128
# Kimi's routed expert weights (its release's MXFP4 ones); group 1 is the part.
_KIMI_EXPERT = re.compile(r"\.block_sparse_moe\.experts\.\d+\.(w[123])\.weight$")


def _as_kimi_k3(sd: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[dict, dict]:
    """Kimi Linear re-spelled as a Kimi K3 release, by the layout NeMo's KimiK3StateDictAdapter and K3
    model document (transformers has no K3 class): the text model under ``language_model.``; A_log as
    ``[128]`` fp32, zero padded past the heads; a latent MoE (``routed_expert_{down,up}_proj``,
    ``routed_expert_norm`` under ``block_sparse_moe.``, the experts drawn here in the latent width);
    attention residual mixers on every layer and the output; a vision tower and projector. config.json is
    the vision-language wrapper's, the text model's (model_type ``kimi_linear``) in ``text_config``."""
    sd, config = _as_kimi_linear(sd, config)
    gen = torch.Generator().manual_seed(17)
    hidden, heads = config["hidden_size"], config["linear_attn_config"]["num_heads"]

    def draw(shape: tuple[int, ...], base: float = 0.0) -> torch.Tensor:
        return (base + torch.randn(shape, generator=gen) * 0.05).to(torch.bfloat16)

    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        expert = _KIMI_EXPERT.search(key)
        if expert:
            out[key] = draw((_K3_LATENT, t.shape[1]) if expert.group(1) == "w2" else (t.shape[0], _K3_LATENT))
        elif key.endswith(".self_attn.A_log"):
            out[key] = torch.nn.functional.pad(t.float().reshape(heads), (0, _K3_A_LOG - heads))
        else:
            out[key] = t
    layers = sorted({m.group(0) for k in sd if (m := re.match(r"model\.layers\.\d+\.", k))})
    for layer in layers:
        if any(k.startswith(layer + "block_sparse_moe.experts.") for k in sd):
            moe = layer + "block_sparse_moe."
            out[moe + "routed_expert_down_proj.weight"] = draw((_K3_LATENT, hidden))
            out[moe + "routed_expert_up_proj.weight"] = draw((hidden, _K3_LATENT))
            out[moe + "routed_expert_norm.weight"] = draw((_K3_LATENT,), 1.0)
        for mixer in ("self_attention", "mlp"):
            out[f"{layer}{mixer}_res_norm.weight"] = draw((hidden,), 1.0)
            out[f"{layer}{mixer}_res_proj.weight"] = draw((1, hidden))
    out["model.output_attn_res_norm.weight"] = draw((hidden,), 1.0)
    out["model.output_attn_res_proj.weight"] = draw((1, hidden))
    out = {("language_model." + k if k.startswith(("model.", "lm_head.")) else k): t for k, t in out.items()}
    out["vision_tower.patch_embed.proj.weight"] = draw((32, 48))
    out["mm_projector.proj.0.weight"] = draw((hidden, 128))
    text = {
        **{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")},
        "architectures": ["KimiK3ForCausalLM"],
        "routed_expert_hidden_size": _K3_LATENT,
        "latent_moe_use_norm": True,
        "attn_res_block_size": 2,
    }
    vision = {
        "model_type": "kimi_k3_vision",
        "vt_hidden_size": 32,
        "vt_num_hidden_layers": 1,
        "text_hidden_size": hidden,
    }
    return out, {
        "architectures": ["KimiK3ForConditionalGeneration"],
        "model_type": "kimi_k3",
        "text_config": text,
        "vision_config": vision,
        "transformers_version": config.get("transformers_version"),
    }


def kimi_k3_state_dict(plain: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kimi K3's release layout: its routed experts MXFP4 in compressed-tensors' mxfp4-pack-quantized
    spelling, uint8 ``K.weight_packed`` ``[out, in/2]`` (two e2m1 codes a byte, low nibble first) beside
    uint8 e8m0 ``K.weight_scale`` ``[out, in/32]``; the rest as it is. One expert gets the extreme
    exponents a bf16 value can still hold every code of (1 and 252)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in plain.items():
        if not _KIMI_EXPERT.search(key):
            out[key] = t
            continue
        codes, scales = flat_mxfp4(t)
        if key.endswith("layers.1.block_sparse_moe.experts.1.w1.weight"):
            scales[0, 0], scales[1, 1] = 1, 252
        out[key + "_packed"], out[key + "_scale"] = codes, scales
    return out


def k3_quantization_config(keys: list[str]) -> dict[str, Any]:
    """The compressed-tensors config of ``kimi_k3_state_dict``'s layout: one MXFP4 (weights only, as
    llm-compressor's MXFP4A16 preset) group for the routed experts, every other Linear ignored."""
    ignored = sorted(
        k.removesuffix(".weight")
        for k in keys
        if k.endswith(".weight") and k.startswith("language_model.model.layers.")
    )
    return {
        "quant_method": "compressed-tensors",
        "format": "mxfp4-pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": [r"re:.*block_sparse_moe\.experts\.\d+\.w[123]$"],
                "weights": {
                    "num_bits": 4,
                    "type": "float",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": 32,
                    "dynamic": False,
                    "scale_dtype": "torch.uint8",
                    "zp_dtype": "torch.uint8",
                },
                "input_activations": None,
                "output_activations": None,
                "format": "mxfp4-pack-quantized",
            }
        },
        "ignore": ["lm_head", "re:vision_tower.*", "re:mm_projector.*", *ignored],
        "kv_cache_scheme": None,
    }


def _as_ling(sd: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[dict, dict]:
    """GLM-4.5-MoE with QK-norm re-spelled as a Ling 2.0 (BailingMoeV2) release, by the layout NeMo's
    ling_v2 adapter documents: q/k/v fused into ``attention.query_key_value.weight`` ``[Q | K | V]``,
    ``word_embeddings``, ``attention.dense`` / ``query_layernorm`` / ``key_layernorm``, the router bias
    as ``mlp.gate.expert_bias``. transformers has no Ling class; the two share every other tensor."""
    renames = (
        ("model.embed_tokens.", "model.word_embeddings."),
        (".self_attn.o_proj.", ".attention.dense."),
        (".self_attn.q_norm.", ".attention.query_layernorm."),
        (".self_attn.k_norm.", ".attention.key_layernorm."),
        (".mlp.gate.e_score_correction_bias", ".mlp.gate.expert_bias"),
    )
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            continue
        if key.endswith("self_attn.q_proj.weight"):
            prefix = key[: -len("self_attn.q_proj.weight")]
            parts = [sd[f"{prefix}self_attn.{p}_proj.weight"] for p in "qkv"]
            out[f"{prefix}attention.query_key_value.weight"] = torch.cat(parts).contiguous()
            continue
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = t
    ling = {
        "architectures": ["BailingMoeV2ForCausalLM"],
        "model_type": "bailing_moe",  # NeMo registers its BailingMoeV2Config under the releases' type
        "num_experts": config["n_routed_experts"],
        "num_shared_experts": config["n_shared_experts"],
        "use_qkv_bias": False,
        "use_bias": False,
        "torch_dtype": "bfloat16",
    }
    same = (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts_per_tok", "n_group",
        "topk_group", "first_k_dense_replace", "rms_norm_eps", "tie_word_embeddings", "use_qk_norm",
        "max_position_embeddings",
    )  # fmt: skip
    return out, {**ling, **{k: config[k] for k in same if k in config}}


TINY_FAMILIES: dict[str, TinyFamily] = {
    "qwen3-moe": TinyFamily(
        "Qwen3MoeForCausalLM",
        {**_TINY_MOE, "num_experts": 4, "mlp_only_layers": [0], "decoder_sparse_step": 1},
    ),
    "glm4-moe": TinyFamily(
        "Glm4MoeForCausalLM",
        {
            **_TINY_MOE,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "attention_bias": True,
        },
    ),
    # Ling 2.0: head widths 256 / 128 / 128, so the fused q | k | v splits on 128-row scale blocks.
    "ling-v2": TinyFamily(
        "Glm4MoeForCausalLM",
        {
            **_TINY_MOE,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "use_qk_norm": True,
        },
        keep=("word_embeddings.",),
        respell=_as_ling,
    ),
    "glm4-moe-lite": TinyFamily("Glm4MoeLiteForCausalLM", _TINY_MLA),
    "kimi-k2": TinyFamily(
        "DeepseekV3ForCausalLM", {**_TINY_MLA, "first_k_dense_replace": 1}, model_type="kimi_k2"
    ),
    "deepseek-v32": TinyFamily(
        "DeepseekV32ForCausalLM", {**_TINY_MLA, **_TINY_INDEXER}, keep=("indexer.weights_proj.weight",)
    ),
    "glm-moe-dsa": TinyFamily(
        "GlmMoeDsaForCausalLM", {**_TINY_MLA, **_TINY_INDEXER}, keep=("indexer.weights_proj.weight",)
    ),
    "minimax-m2": TinyFamily(
        "MiniMaxM2ForCausalLM",
        {**_TINY_DENSE, "intermediate_size": 96, "num_local_experts": 4, "num_experts_per_tok": 2},
        keep=("block_sparse_moe.gate.weight",),
    ),
    # MiniMax-M3 VLM: hidden 80 and expert width 48 leave a partial 32-column MXFP8 block; layer 0 dense,
    # layer 1 sparse with the sparse-attention indexer. The vendor keeps the router, the indexer and the
    # patch merger in bf16 (NeMo's _MXFP8_QUANT_KEY_RE: attention, dense and expert projections only).
    "minimax-m3": TinyFamily(
        "MiniMaxM3SparseForConditionalGeneration",
        {
            "text_config": {
                "vocab_size": 300,
                "hidden_size": 80,
                "intermediate_size": 48,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "dense_intermediate_size": 96,
                "shared_intermediate_size": 48,
                "rotary_dim": 8,
                "index_n_heads": 2,
                "index_head_dim": 16,
                "index_block_size": 4,
                "mlp_layer_types": ["dense", "sparse"],
                "layer_types": ["full_attention", "minimax_m3_sparse"],
            },
            "vision_config": TINY_SIGLIP,
            "projector_hidden_size": 64,
        },
        keep=("block_sparse_moe.gate.weight", "self_attn.index_", "patch_merge_mlp."),
    ),
    # Inkling: layer 0 dense (its 2-D w13_dn [192, 64] and w2_md [64, 96] transposed whole), layer 1
    # sparse; hidden 64 with expert width 48, so the stored [E, 2I, H] and [E, H, I] experts are not
    # square. The vendor FP8 layout is a guess (no FP8 Inkling is published): the 2-D projections, not
    # the embeddings, convolutions, audio or vision.
    "inkling": TinyFamily(
        "InklingForConditionalGeneration",
        {
            "text_config": {
                "vocab_size": 300,
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 32,
                "swa_num_attention_heads": 2,
                "swa_num_key_value_heads": 1,
                "swa_head_dim": 32,
                "sliding_window_size": 8,
                "d_rel": 4,
                "rel_extent": 16,
                "intermediate_size": 96,
                "moe_intermediate_size": 48,
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "n_shared_experts": 1,
                "local_layer_ids": [1],
                "mlp_layer_types": ["dense", "sparse"],
            },
            "vision_config": {
                "text_hidden_size": 64,
                "hidden_size": 32,
                "n_layers": 1,
                "num_attention_heads": 2,
                "patch_size": 4,
            },
            "audio_config": {"text_hidden_size": 64, "n_mel_bins": 8, "mel_vocab_size": 16},
        },
        keep=("embed.weight", "unembed.weight", "sconv.weight", "model.audio.", "model.visual."),
    ),
    # Nemotron-H / Nemotron 3: one layer of each kind (Mamba-2, MoE, attention, dense MLP), under the
    # release's backbone. names (transformers saves them so). The vendor leaves the Mamba convolution,
    # the router and the embeddings in bf16.
    "nemotron-v3": TinyFamily(
        "NemotronHForCausalLM",
        {
            "vocab_size": 300,
            "hidden_size": 64,
            "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"],
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "intermediate_size": 96,
            "ssm_state_size": 16,
            "mamba_num_heads": 4,
            "mamba_head_dim": 16,
            "n_groups": 1,
            "conv_kernel": 4,
            "expand": 1,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "moe_intermediate_size": 48,
            "moe_shared_expert_intermediate_size": 48,
            "num_experts_per_tok": 2,
            # finite: config.json spells the default's infinity {"__float__": "Infinity"}, which only
            # transformers' own from_pretrained reads back
            "time_step_limit": [0.0, 100.0],
        },
        keep=("embeddings.weight", "mixer.gate.weight", "conv1d.weight", "norm_f.weight"),
    ),
    "step3p7": TinyFamily("Step3p7ForConditionalGeneration", _TINY_STEP, keep=_STEP_KEEP),
    "step3p5": TinyFamily(
        "Step3p7ForConditionalGeneration", _TINY_STEP, keep=_STEP_KEEP, text_only="Step3p5ForCausalLM"
    ),
    # Qwen3.5 releases store A_log and the GatedDeltaNet norm in fp32, Qwen3.6 ones in bf16: one of each.
    "qwen3.5-moe": TinyFamily(
        "Qwen3_5MoeForConditionalGeneration",
        _TINY_QWEN3_5,
        keep=_QWEN3_5_KEEP,
        fp32=("linear_attn.A_log", "linear_attn.norm.weight"),
    ),
    "qwen3.5-moe-text": TinyFamily("Qwen3_5MoeForCausalLM", _TINY_QWEN3_5_TEXT, keep=_QWEN3_5_KEEP),
    # Qwen3.5 dense (Qwen3.5-27B): the MoE's text model with a dense MLP.
    "qwen3.5": TinyFamily(
        "Qwen3_5ForConditionalGeneration",
        {"text_config": {**_TINY_QWEN3_5_TEXT, "intermediate_size": 200}, "vision_config": _TINY_QWEN_VISION},
        keep=_QWEN3_5_KEEP,
        fp32=("linear_attn.A_log", "linear_attn.norm.weight"),
    ),
    "qwen3.5-text": TinyFamily(
        "Qwen3_5ForCausalLM", {**_TINY_QWEN3_5_TEXT, "intermediate_size": 200}, keep=_QWEN3_5_KEEP
    ),
    # Qwen3-Next: Qwen3.5-MoE's text widths; the release's bf16 modules assumed from Qwen's later FP8
    # releases (no Qwen3-Next FP8 config.json was at hand): norms, routers, conv1d, in_proj_ba.
    "qwen3-next": TinyFamily(
        "Qwen3NextForCausalLM",
        _TINY_QWEN3_5_TEXT,
        keep=("shared_expert_gate.weight", "conv1d.weight", "in_proj_ba.weight"),
    ),
    "qwen3-vl-moe": TinyFamily(
        "Qwen3VLMoeForConditionalGeneration",
        {
            "text_config": {**_TINY_MOE, "num_experts": 4},
            "vision_config": {**_TINY_QWEN_VISION, "deepstack_visual_indexes": [0]},
        },
        keep=("visual.",),
        hub_transpose=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    ),
    "mimo-v2-flash": TinyFamily(
        "MiMoV2FlashForCausalLM",
        {**_TINY_MOE, "n_routed_experts": 4, "v_head_dim": 32, "mlp_layer_types": ["dense", "sparse"]},
        keep=("self_attn.o_proj.weight",),
    ),
    # MiMo-V2.5-Pro: two key/value heads, so two shards of 152 (full) and 136 (sliding-window) rows, which
    # no 128-row grid fits: the scale restarts its blocks at every shard.
    "mimo-v2.5-pro": TinyFamily(
        "MiMoV2FlashForCausalLM",
        _TINY_MIMO,
        keep=("self_attn.o_proj.weight",),
        respell=_as_mimo_v25,
        row_shards=("self_attn.qkv_proj.weight", 2),
    ),
    # MiMo-V2.5 as MiMoV2ForCausalLM: the same release layout, its shard count in the index (tp_size).
    "mimo-v2": TinyFamily(
        "MiMoV2FlashForCausalLM",
        _TINY_MIMO,
        keep=("self_attn.o_proj.weight",),
        respell=partial(_as_mimo_v25, architecture="MiMoV2ForCausalLM"),
        row_shards=("self_attn.qkv_proj.weight", 2),
        index_metadata={"tp_size": 2},
    ),
    "glm5-next": TinyFamily("Glm5NextForConditionalGeneration", _TINY_GLM5_NEXT, keep=_GLM5_NEXT_KEEP),
    # Qwen3-Omni MoE as the Instruct release (audio output on: a talker with its own experts and code2wav):
    # the smallest audio and vision towers and speech modules, thinker head dim 32.
    "qwen3-omni-moe": TinyFamily(
        "Qwen3OmniMoeForConditionalGeneration",
        {
            "thinker_config": {
                "text_config": {
                    **_TINY_MOE,
                    "intermediate_size": 320,
                    "num_attention_heads": 5,
                    "num_experts": 4,
                    "moe_intermediate_size": 64,
                    "rope_parameters": {
                        "rope_type": "default",
                        "rope_theta": 1e6,
                        "mrope_section": [8, 4, 4],
                        "mrope_interleaved": True,
                    },
                },
                "vision_config": {
                    "depth": 2,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_heads": 2,
                    "out_hidden_size": 160,
                    "num_position_embeddings": 16,
                    "deepstack_visual_indexes": [0, 1],
                    "patch_size": 16,
                    "temporal_patch_size": 2,
                    "spatial_merge_size": 2,
                },
                "audio_config": {
                    "num_mel_bins": 128,
                    "encoder_layers": 1,
                    "encoder_attention_heads": 2,
                    "encoder_ffn_dim": 64,
                    "d_model": 32,
                    "output_dim": 160,
                    "downsample_hidden_size": 32,
                    "max_source_positions": 64,
                },
            },
            "enable_audio_output": True,
            "talker_config": {
                "text_config": {
                    **_TINY_SPEECH,
                    "moe_intermediate_size": 32,
                    "num_experts": 4,
                    "num_experts_per_tok": 2,
                    "shared_expert_intermediate_size": 64,
                    "rope_parameters": {
                        "rope_type": "default",
                        "rope_theta": 1e6,
                        "mrope_section": [8, 4, 4],
                        "mrope_interleaved": True,
                    },
                },
                "code_predictor_config": {**_TINY_SPEECH, "num_code_groups": 4},
                "num_code_groups": 4,
                "thinker_hidden_size": 160,
                "accept_hidden_layer": 1,
                "spatial_merge_size": 2,
            },
            "code2wav_config": {
                "codebook_size": 64,
                "hidden_size": 64,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "intermediate_size": 128,
                "num_hidden_layers": 1,
                "num_quantizers": 4,
                "decoder_dim": 32,
                "upsample_rates": [2, 2],
                "upsampling_ratios": [2],
                "sliding_window": 8,
            },
        },
        keep=("audio_tower.", "visual.", "code2wav."),
    ),
    "qwen3": TinyFamily("Qwen3ForCausalLM", _TINY_DENSE),
    "gemma3": TinyFamily("Gemma3ForCausalLM", _TINY_DENSE),
    "gemma3-vlm": TinyFamily(
        "Gemma3ForConditionalGeneration",
        {"text_config": _TINY_DENSE, "vision_config": TINY_SIGLIP, "mm_tokens_per_image": 4},
    ),
    # Gemma 4 dense: a sliding and a full attention layer with per-layer inputs, a one-layer vision tower.
    "gemma4": TinyFamily(
        "Gemma4ForConditionalGeneration",
        {
            "text_config": {
                **_TINY_DENSE,
                "head_dim": 32,
                "vocab_size_per_layer_input": _TINY_DENSE["vocab_size"],
                "hidden_size_per_layer_input": 16,
                "layer_types": ["sliding_attention", "full_attention"],
                "sliding_window": 16,
            },
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "head_dim": 16,
            },
            "audio_config": None,
        },
        keep=("embed_tokens_per_layer.", "model.vision_tower.", "model.embed_vision."),
    ),
    "gemma4-text": TinyFamily(
        "Gemma4ForCausalLM", {**_TINY_DENSE, "head_dim": 32, "hidden_size_per_layer_input": 0}
    ),
    # Gemma 4 Unified: a sliding and a full attention layer, the smallest vision embedder.
    "gemma4-unified": TinyFamily(
        "Gemma4UnifiedForConditionalGeneration",
        {
            "text_config": {
                **_TINY_DENSE,
                "head_dim": 32,
                "layer_types": ["sliding_attention", "full_attention"],
                "sliding_window": 16,
            },
            "vision_config": {
                "patch_size": 4,
                "pooling_kernel_size": 2,
                "mm_embed_dim": 32,
                "mm_posemb_size": 16,
                "output_proj_dims": 160,
            },
            "audio_config": None,
        },
        keep=("vision_embedder.", "embed_vision."),
    ),
    # Widths that are multiples of 32 (MXFP4 blocks run along the input dimension): hidden 64, expert 96.
    "gpt-oss": TinyFamily(
        "GptOssForCausalLM",
        {
            "vocab_size": 300,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
        },
    ),
    "deepseek-v4": TinyFamily("DeepseekV4ForCausalLM", _TINY_V4, respell=_as_deepseek_v4),
    # DeepSeek-V4.1: V4's tiny model re-spelled (_as_deepseek_v41), an Engram on layer 1.
    "deepseek-v4.1": TinyFamily("DeepseekV4ForCausalLM", _TINY_V4, respell=_as_deepseek_v41),
    # Hy3: layer 0 dense, layer 1 MoE with a shared expert; the vendor keeps the router in bf16.
    "hy-v3": TinyFamily(
        "HYV3ForCausalLM",
        {
            **_TINY_MOE,
            "num_experts": 4,
            "num_shared_experts": 1,
            "mlp_layer_types": ["dense", "sparse"],
            "first_k_dense_replace": 1,
        },
        keep=("mlp.router.gate.weight",),
    ),
    # ERNIE 4.5 MoE: layer 0 dense, layer 1 MoE with a shared expert; its router bias is [1, E].
    "ernie4.5-moe": TinyFamily(
        "Ernie4_5_MoeForCausalLM",
        {
            **_TINY_DENSE,
            "use_bias": False,
            "moe_intermediate_size": 96,
            "moe_num_experts": 4,
            "moe_k": 2,
            "moe_num_shared_experts": 1,
            "moe_layer_start_index": 1,
            "moe_layer_interval": 1,
        },
    ),
    "kimi-linear": TinyFamily(
        "KimiLinearForCausalLM",
        _TINY_KIMI_LINEAR,
        keep=_KIMI_KEEP,
        fp32=("self_attn.dt_bias",),
        respell=_as_kimi_linear,
    ),
    # Kimi K3: Kimi Linear's layers re-spelled (see _as_kimi_k3); its release quantizes the experts only.
    "kimi-k3": TinyFamily(
        "KimiLinearForCausalLM",
        _TINY_KIMI_LINEAR,
        keep=(*_KIMI_KEEP, "_res_proj."),
        fp32=("self_attn.dt_bias",),
        respell=_as_kimi_k3,
    ),
    # Laguna: layer 0 full attention with a dense MLP, layer 1 sliding with 8 heads and experts.
    "laguna": TinyFamily(
        "LagunaForCausalLM",
        {
            **_TINY_DENSE,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "num_attention_heads_per_layer": [4, 8],
            "layer_types": ["full_attention", "sliding_attention"],
            "sliding_window": 16,
            "mlp_layer_types": ["dense", "sparse"],
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 96,
            "shared_expert_intermediate_size": 96,
            "gating": True,
        },
        keep=("self_attn.g_proj.",),
    ),
    "ernie4.5": TinyFamily("Ernie4_5ForCausalLM", {**_TINY_DENSE, "use_bias": False}),
    "llama": TinyFamily("LlamaForCausalLM", _TINY_DENSE),
    "mistral": TinyFamily("MistralForCausalLM", _TINY_DENSE),
}

FAMILIES: tuple[str, ...] = ("mistral4", "mistral4-vlm", "mistral3-fp8", "deepseek-v3", *TINY_FAMILIES)
LAYOUTS: dict[str, tuple[str, ...]] = {
    "mistral4": ("default", "prefixed"),
    "mistral4-vlm": ("default",),
    "mistral3-fp8": ("default", "identity", "causal"),
    "deepseek-v3": ("default",),
    **dict.fromkeys(TINY_FAMILIES, ("default",)),
}


# --------------------------------------------------------------------------------------------------
# Key rules
# --------------------------------------------------------------------------------------------------


def _natural_key(key: str) -> list[Any]:
    """Sort ``layers.10`` after ``layers.9``, as a module walk would."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def _check_args(family: str, layout: str, scheme: str | None = None) -> None:
    if family not in LAYOUTS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if layout not in LAYOUTS[family]:
        raise ValueError(f"family {family!r} has no layout {layout!r}; expected one of {LAYOUTS[family]}")
    if scheme is not None:
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
        if scheme == "per-expert" and family not in _PER_EXPERT_FAMILIES:
            raise ValueError(f"scheme 'per-expert' needs aggregated 3-D experts; {family!r} has none")
        if (scheme == "mxfp4") != (family in _MXFP4_FAMILIES):
            raise ValueError(f"scheme 'mxfp4' is for {_MXFP4_FAMILIES} only, which have no other scheme")
        if scheme == "mxfp8" and family not in _MXFP8_FAMILIES:
            raise ValueError(f"scheme 'mxfp8' is for {_MXFP8_FAMILIES} only")
        if (scheme in ("fp8-v4", "fp8-v4-base")) != (family in _V4_FAMILIES):
            raise ValueError(f"schemes 'fp8-v4*' are for {_V4_FAMILIES} only, which have no other scheme")
        if (scheme == "fp8-v41") != (family in _V41_FAMILIES):
            raise ValueError(f"scheme 'fp8-v41' is for {_V41_FAMILIES} only, which have no other scheme")
        if scheme == "fp8-mxfp4" and family not in _V26_FAMILIES:
            raise ValueError(f"scheme 'fp8-mxfp4' is for {_V26_FAMILIES} only")
        if scheme == "mxfp4-ct" and family not in _K3_FAMILIES:
            raise ValueError(f"scheme 'mxfp4-ct' is for {_K3_FAMILIES} only")


def _make_model(family: str, layout: str, tied: bool) -> torch.nn.Module:
    """Instantiate the transformers class a vendor checkpoint of this family is saved from."""
    import transformers as tf

    if family in TINY_FAMILIES:
        spec = TINY_FAMILIES[family]
        model_cls = getattr(tf, spec.model)
        config = model_cls.config_class(**spec.config, tie_word_embeddings=tied)
        return model_cls(config)
    if family == "mistral4":
        return tf.Mistral4ForCausalLM(tf.Mistral4Config(**TINY_MOE_TEXT, tie_word_embeddings=tied))
    if family == "deepseek-v3":
        return tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(**TINY_MOE_TEXT, tie_word_embeddings=tied))
    vision = tf.PixtralVisionConfig(**TINY_PIXTRAL)
    if family == "mistral4-vlm":
        text = tf.Mistral4Config(**TINY_MOE_TEXT, tie_word_embeddings=tied)
        cfg = tf.Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=tied)
        return tf.Mistral3ForConditionalGeneration(cfg)
    # mistral3-fp8
    text3 = tf.Ministral3Config(**TINY_MINISTRAL3_TEXT, tie_word_embeddings=tied)
    if layout == "causal":
        return tf.Ministral3ForCausalLM(text3)
    cfg = tf.Mistral3Config(text_config=text3, vision_config=vision, tie_word_embeddings=tied)
    return tf.Mistral3ForConditionalGeneration(cfg)


def _rename_for_layout(key: str, family: str, layout: str) -> str:
    """Re-spell transformers' saved keys the way the other real checkpoints of the family spell them."""
    if family == "mistral4" and layout == "prefixed":
        return "language_model." + key
    if family == "mistral3-fp8" and layout == "identity":
        if key == "language_model.lm_head.weight":
            return "lm_head.weight"
        if key.startswith("language_model.model."):
            return "model.language_model." + key[len("language_model.model.") :]
        if key.startswith(("vision_tower.", "multi_modal_projector.")):
            return "model." + key
    return key


def _make_distinct(sd: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """Give every constant tensor (norms at 1, biases at 0) random values, so swaps are detectable."""
    for key, t in sd.items():
        flat = t.float().flatten()
        if flat.numel() > 1 and bool((flat == flat[0]).all()):
            noise = torch.randn(t.shape, generator=gen) * 0.05
            base = 1.0 if float(flat[0]) == 1.0 else 0.0
            sd[key] = (base + noise).to(t.dtype)


def _plant_zero_blocks(sd: dict[str, torch.Tensor]) -> None:
    """Zero one full 128x128 block and one whole expert, so 'all-zero gets scale 1' is exercised."""
    dense = [k for k in sd if k.endswith("layers.0.mlp.gate_proj.weight")]
    for k in dense:  # [200, 160]: block (0, 0) is a full block
        sd[k] = sd[k].clone()
        sd[k][:BLOCK, :BLOCK] = 0
    for k in sd:
        if k.endswith("layers.1.mlp.experts.gate_up_proj"):  # [E, 2I, H]: block (0, 0) of expert 1
            sd[k] = sd[k].clone()
            sd[k][1, :BLOCK, :BLOCK] = 0
        if k.endswith("layers.1.mlp.experts.down_proj"):  # whole expert 2 → per-expert scale 1
            sd[k] = sd[k].clone()
            sd[k][2] = 0
        if k.endswith("layers.1.mlp.experts.2.down_proj.weight"):  # DeepSeek: whole tensor → scale 1
            sd[k] = torch.zeros_like(sd[k])
        if k.endswith("layers.1.moe.up_proj.weight"):  # Step [E, I, H]: expert 1 all zero → scales 1
            sd[k] = sd[k].clone()
            sd[k][1] = 0


def _saved_model(
    family: str, layout: str, tied: bool, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """State dict, config.json and generation_config.json exactly as save_pretrained writes them
    (then re-spelled for the layout), with values made distinct and the zero blocks planted."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _make_model(family, layout, tied).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed + 1)
    with tempfile.TemporaryDirectory(prefix="recast-fixture-") as tmp:
        model.save_pretrained(tmp)
        raw: dict[str, torch.Tensor] = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            raw.update(load_file(f))
        config = json.loads((Path(tmp) / "config.json").read_text())
        if family in TINY_FAMILIES and TINY_FAMILIES[family].model_type:
            config["model_type"] = TINY_FAMILIES[family].model_type
        if family in TINY_FAMILIES and TINY_FAMILIES[family].text_only:
            raw = {k: t for k, t in raw.items() if k.startswith(("model.", "lm_head."))}
            config = {**config["text_config"], "architectures": [TINY_FAMILIES[family].text_only]}
        if family in TINY_FAMILIES and TINY_FAMILIES[family].respell:
            raw, config = TINY_FAMILIES[family].respell(raw, config)
        gen_path = Path(tmp) / "generation_config.json"
        gen_config = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    sd = {_rename_for_layout(k, family, layout): raw[k] for k in sorted(raw, key=_natural_key)}
    if family == "deepseek-v3" or family in TINY_FAMILIES:
        # DeepSeek ships the router bias in fp32 (their inference code keeps it fp32), and so do the MoE
        # families that took its router (MiniMax's sits at block_sparse_moe.); .to(bf16) did not.
        for k in sd:
            if k.endswith(
                "mlp.gate.e_score_correction_bias" if family == "deepseek-v3" else "e_score_correction_bias"
            ):
                sd[k] = sd[k].float()
    if family in TINY_FAMILIES:
        spec = TINY_FAMILIES[family]
        for k in sd:
            if k.endswith(spec.fp32 or ("\0",)):
                sd[k] = sd[k].float()
            if k.endswith(spec.hub_transpose or ("\0",)):
                sd[k] = sd[k].transpose(-1, -2).contiguous()
    _make_distinct(sd, gen)
    _plant_zero_blocks(sd)
    return sd, config, gen_config


# --------------------------------------------------------------------------------------------------
# Quantization (the "vendor" side; tests/reference.py has its own, independent implementation)
# --------------------------------------------------------------------------------------------------


def _safe_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def _block_scales(w32: torch.Tensor) -> torch.Tensor:
    rows, cols = w32.shape[-2:]
    nr, nc = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    padded = torch.zeros(*w32.shape[:-2], nr * BLOCK, nc * BLOCK)
    padded[..., :rows, :cols] = w32.abs()
    amax = padded.reshape(*w32.shape[:-2], nr, BLOCK, nc, BLOCK).amax(dim=(-3, -1))
    return _safe_scale(amax)


def _expand_blocks(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    big = scale.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    return big[..., : shape[-2], : shape[-1]]


def _quantize(
    w: torch.Tensor, scheme: str, scalar_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize one weight; returns (fp8 weight, fp32 scale with its on-disk shape)."""
    w32 = w.float()
    if scheme == "block":
        scale = _block_scales(w32)
        full = _expand_blocks(scale, w.shape)
    elif scheme == "per-expert" and w.ndim == 3:
        scale = full = _safe_scale(w32.abs().amax(dim=(1, 2), keepdim=True))
    elif scheme == "per-channel":  # one scale per output row: [R, 1], [E, R, 1] for 3-D experts
        scale = full = _safe_scale(w32.abs().amax(dim=-1, keepdim=True))
    else:
        full = _safe_scale(w32.abs().amax())
        scale = full.reshape(scalar_shape)
    q = (w32 / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.to(torch.float32).contiguous()


def mxfp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight ``[..., out, in]`` as MiniMax-M3 stores it: e4m3 codes and ``[..., out, ⌈in/32⌉]`` uint8
    e8m0 exponents. By the OCP Microscaling definition: per 32 values of a row, the shared exponent is
    ``floor(log2(amax)) - 8`` (e4m3's largest exponent), each value divided by ``2^exp`` and rounded to
    e4m3 (clamped to 448). Written by hand, independently of the engine and of NeMo's reader."""
    v = w.float()
    width = v.shape[-1]
    groups = -(-width // 32)
    padded = torch.nn.functional.pad(v, (0, groups * 32 - width)).reshape(*v.shape[:-1], groups, 32)
    amax = padded.abs().amax(-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 8, torch.zeros_like(amax))
    scaled = padded / torch.pow(2.0, exp).unsqueeze(-1)
    codes = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(*v.shape[:-1], groups * 32)[..., :width]
    return codes.contiguous(), (exp + 127).to(torch.uint8)


# e2m1 magnitudes of codes 0-7 (8-15 are their negatives), by the OCP Microscaling spec.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MXFP4_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# Blocks whose exponents are set to the extremes a bf16 value can still hold every code of (1 and 252).
_MXFP4_EXTREMES = ((0, 0, 0, 1), (1, 1, 0, 252))


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One gpt-oss expert tensor ``[E, in, out]`` (transformers' layout) as OpenAI's release stores it:
    ``[E, out, in/32, 16]`` uint8 blocks and ``[E, out, in/32]`` uint8 scales.

    By the OCP Microscaling definition: per block of 32 values along ``in``, the shared exponent is
    ``floor(log2(amax)) - 2`` (e2m1's largest exponent), each value is rounded to the nearest e2m1
    magnitude of ``|v| / 2^exp`` (clamped to 6) with its sign, and two codes share a byte, low nibble
    first. Written here by hand, independently of the engine's reader (transformers' own quantizer,
    ``quantize_to_mxfp4``, needs the Triton kernels hub)."""
    v = w.float().transpose(1, 2)
    e, out, width = v.shape
    groups = v.reshape(e, out, width // 32, 32)
    amax = groups.abs().amax(-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.zeros_like(amax))
    scaled = groups / torch.pow(2.0, exp).unsqueeze(-1)
    magnitudes = torch.tensor(E2M1)
    nearest = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(-1)
    codes = nearest | (torch.signbit(scaled).long() << 3)
    pairs = codes.reshape(e, out, width // 32, 16, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)


def flat_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One 2-D weight ``[out, in]`` as MXFP4 spelled flat, as DeepSeek-V4, MiMo-V2.6 and Kimi K3 store their
    experts: uint8 codes ``[out, in/2]`` (two a byte, low nibble first) and uint8 e8m0 exponents
    ``[out, in/32]``, by ``mxfp4_quantize``."""
    blocks, scales = mxfp4_quantize(w.T.unsqueeze(0))
    return blocks[0].reshape(w.shape[0], -1), scales[0]


def mxfp4_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gpt-oss's release layout: each expert tensor ``K`` becomes ``K_blocks`` and ``K_scales``, the rest
    stays bf16. A few blocks get extreme exponents, so the whole range a bf16 value can hold is read."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if not key.endswith(MXFP4_EXPERTS):
            out[key] = t
            continue
        blocks, scales = mxfp4_quantize(t)
        for index in _MXFP4_EXTREMES:
            scales[index[:3]] = index[3]
        out[f"{key}_blocks"], out[f"{key}_scales"] = blocks, scales
    return out


# What DeepSeek-V4's release keeps in bf16 (NeMo's _NON_QUANTIZED_PATTERNS for it, which are its to_hf's).
_V4_KEEP = (
    "norm.weight", "head.weight", "embed.weight", "ffn.gate.", "attn.attn_sink", "compressor.wgate.weight",
    "compressor.wkv.weight", "indexer.weights_proj.weight", "latent_proj.weight",
)  # fmt: skip
# DeepSeek-V4-Flash's quantization_config (FP4 experts are declared by config.json's expert_dtype).
V4_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [BLOCK, BLOCK],
}


def deepseek_v4_state_dict(sd: dict[str, torch.Tensor], fp4_experts: bool = True) -> dict[str, torch.Tensor]:
    """DeepSeek-V4-Flash's release layout, each quantized ``K.weight`` beside ``K.scale``.

    Routed experts as FP4 (int8 ``[out, in/2]``, two e2m1 codes a byte, low nibble first, with
    ``F8_E8M0`` exponents ``[out, in/32]``, by the OCP definition ``mxfp4_quantize`` writes; one expert
    group gets the extreme exponents 1 and 252), or with ``fp4_experts`` False as the other matrices
    (V4-Flash-Base): e4m3 with one power-of-two scale per 128x128 block (``F8_E8M0``: amax/448 rounded up
    to a power of two, as DeepSeek's ue8m0 kernels do)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        scale_key = key.removesuffix("weight") + "scale"
        if ".ffn.experts." in key and fp4_experts:
            codes, scales = flat_mxfp4(t)
            if key.endswith("layers.1.ffn.experts.1.w1.weight"):
                scales[0, 0], scales[1, 1] = 1, 252
            out[key], out[scale_key] = codes.view(torch.int8), scales.view(torch.float8_e8m0fnu)
        elif key.endswith(".weight") and t.ndim == 2 and not any(p in key for p in _V4_KEEP):  # e4m3 blocks
            scale = torch.exp2(torch.ceil(torch.log2(_block_scales(t.float()))))
            out[key] = (t.float() / _expand_blocks(scale, t.shape)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            out[scale_key] = scale.to(torch.float8_e8m0fnu)
        else:
            out[key] = t
    return out


# DeepSeek-V4.1's quantized weights (NeMo's DeepseekV41StateDictAdapter.to_hf lists them so): the
# attention projections, the indexer's query, the experts and the Engram table and projection.
_V41_QUANTIZED = re.compile(
    r"(?:layers|mtp)\.\d+\.(?:attn\.(?:wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)"
    r"|ffn\.(?:shared_experts|experts\.\d+)\.w[123]|engram\.(?:embed|wkv))\.weight"
)
V41_CONFIG = {**V4_CONFIG, "weight_block_size": [32, 32]}


def _e8m0_blocks(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Power-of-two scales (amax / 448 rounded up, as DeepSeek's ue8m0 kernels do) per ``rows x cols`` block."""
    r, c = w.shape
    nr, nc = -(-r // rows), -(-c // cols)
    padded = torch.zeros(nr * rows, nc * cols)
    padded[:r, :c] = w.float().abs()
    amax = padded.reshape(nr, rows, nc, cols).amax(dim=(1, 3))
    return torch.exp2(torch.ceil(torch.log2(_safe_scale(amax))))


def deepseek_v41_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepSeek-V4.1-Flash's release layout (NeMo's adapter documents it from the shard headers), each
    quantized ``K.weight`` beside an ``F8_E8M0`` ``K.scale``: routed experts FP4 as V4-Flash's; the Engram
    table e4m3 with one scale per 32 columns of a row; the other quantized matrices e4m3 with one scale per
    32x32 block."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        scale_key = key.removesuffix("weight") + "scale"
        if ".ffn.experts." in key:
            codes, scales = flat_mxfp4(t)
            out[key], out[scale_key] = codes.view(torch.int8), scales.view(torch.float8_e8m0fnu)
        elif _V41_QUANTIZED.fullmatch(key):
            rows = 1 if ".engram.embed." in key else 32
            scale = _e8m0_blocks(t, rows, 32)
            full = scale.repeat_interleave(rows, 0).repeat_interleave(32, 1)[: t.shape[0], : t.shape[1]]
            out[key] = (t.float() / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            out[scale_key] = scale.to(torch.float8_e8m0fnu)
        else:
            out[key] = t
    return out


def mimo_v26_state_dict(
    fp8: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """MiMo-V2.6's release layout, by NeMo's MiMo-V2-Flash adapter: the block-FP8 state dict ``fp8`` with
    its routed experts MXFP4 instead, uint8 ``K.weight`` ``[out, in/2]`` (two e2m1 codes a byte, low nibble
    first) and uint8 e8m0 ``K.weight_scale`` ``[out, in/32]``, from their bf16 values in ``plain``."""
    out: dict[str, torch.Tensor] = {}
    for key, t in fp8.items():
        if re.search(r"\.mlp\.experts\.\d+\.\w+\.weight_scale_inv$", key):
            continue
        if re.search(r"\.mlp\.experts\.\d+\.\w+\.weight$", key):
            out[key], out[key + "_scale"] = flat_mxfp4(plain[key])
            continue
        out[key] = t
    return out


# What OpenAI's gpt-oss config.json says (its quantization_config, verbatim).
MXFP4_CONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}


def _vendor_quantizes(family: str, key: str) -> bool:
    """Whether the vendor of ``family`` stores ``key`` as FP8."""
    keep = TINY_FAMILIES[family].keep if family in TINY_FAMILIES else ()
    return is_quantizable(key) and not any(p in key for p in keep)


def _quantization_config(
    scheme: str, keys: list[str], sd: dict[str, torch.Tensor], family: str
) -> dict[str, Any]:
    """The config block vendors write; modules_to_not_convert lists what stayed high precision."""
    not_converted: set[str] = set()
    for k in keys:
        for p in NEVER_QUANTIZED_PREFIXES:
            if k.startswith(p):
                not_converted.add(p.rstrip("."))
                break
        else:
            if k.endswith(".weight") and sd[k].ndim >= 2 and not _vendor_quantizes(family, k):
                not_converted.add(k[: -len(".weight")])
    block = {"block": [BLOCK, BLOCK], "mxfp8": [1, 32]}.get(scheme)
    return {
        "quant_method": "fp8",
        "activation_scheme": "static" if scheme == "per-tensor" else "dynamic",
        "weight_block_size": block,
        **({"scale_fmt": "ue8m0"} if scheme == "mxfp8" else {}),
        "modules_to_not_convert": sorted(not_converted),
    }


def quantize_state_dict(
    sd: dict[str, torch.Tensor], family: str, scheme: str, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Vendor-style FP8 state dict: each quantizable key followed by its scale (and activation scale).

    Per-tensor scales are stored as ``[]`` for mistral3-fp8 (the 128B checkpoint's 0-d scalars) and as
    ``[1]`` for the other families, so both on-disk spellings of "one element" are exercised.
    """
    scalar_shape: tuple[int, ...] = () if family == "mistral3-fp8" else (1,)
    gen = torch.Generator().manual_seed(seed + 2)
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if not _vendor_quantizes(family, key):
            out[key] = t
            continue
        sharded = TINY_FAMILIES[family].row_shards if family in TINY_FAMILIES else None
        if sharded and scheme == "block" and key.endswith(sharded[0]):  # a grid per shard
            q, s = _quantize(t.reshape(sharded[1], -1, t.shape[-1]), scheme, scalar_shape)
            q, s = q.reshape(t.shape), s.reshape(-1, s.shape[-1])
        else:
            q, s = mxfp8_quantize(t) if scheme == "mxfp8" else _quantize(t, scheme, scalar_shape)
        out[key] = q
        out[scale_key(key)] = s
        if scheme == "per-tensor":  # static activation scheme: any positive fp32 scalar
            act = (torch.rand((), generator=gen) * 0.05 + 0.01).reshape(scalar_shape)
            out[activation_scale_key(key)] = act.to(torch.float32)
    return out


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _assign_shards(sd: dict[str, torch.Tensor], shards: int) -> dict[str, int]:
    """Contiguous, byte-balanced shard assignment (what save_pretrained's max_shard_size does), with
    every scale and activation scale in its weight's shard; ``_split_work_units`` then breaks that."""
    owner: dict[str, str] = {}
    for k in sd:
        for side in (scale_key(k), activation_scale_key(k)):
            if side in sd and side != k:
                owner[side] = k
    keys = [k for k in sd if k not in owner]
    total = sum(_nbytes(sd[k]) for k in keys)
    assign: dict[str, int] = {}
    done = 0
    for k in keys:
        assign[k] = min(shards - 1, (done * shards) // max(total, 1))
        done += _nbytes(sd[k])
    if len(set(assign.values())) < shards:  # a huge tensor skipped a shard: fall back to counts
        assign = {k: min(shards - 1, i * shards // len(keys)) for i, k in enumerate(keys)}
    for side, k in owner.items():
        assign[side] = assign[k]
    return assign


def _split_work_units(sd: dict[str, torch.Tensor], assign: dict[str, int], shards: int) -> None:
    """Move some scales (and one DeepSeek expert) away from their weights, as real checkpoints do."""
    if shards < 2:
        return
    weights = [k for k in sd if scale_key(k) in sd]
    picks: list[str] = []
    if weights:
        picks.append(weights[0])
    experts = [k for k in weights if ".mlp.experts." in k]
    if experts:
        picks.append(experts[-1])
    if weights[-1:] and weights[-1] not in picks:
        picks.append(weights[-1])
    for k in picks:
        assign[scale_key(k)] = (assign[k] + 1) % shards
    act = [k for k in weights if activation_scale_key(k) in sd]
    if act:
        assign[activation_scale_key(act[len(act) // 2])] = (assign[act[len(act) // 2]] + shards - 1) % shards
    # DeepSeek: all experts of one layer are one work unit; make that unit span two shards.
    expert0 = [k for k in sd if re.search(r"\.layers\.1\.mlp\.experts\.0\.", k)]
    expert1 = [k for k in sd if re.search(r"\.layers\.1\.mlp\.experts\.1\.", k)]
    if expert0 and expert1:
        target = (assign[expert1[0]] + 1) % shards
        for k in expert0:
            assign[k] = target


def _write_shards(
    dst: Path, sd: dict[str, torch.Tensor], assign: dict[str, int], shards: int, metadata: dict[str, Any]
) -> None:
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    for i, name in enumerate(names):
        part = {k: t.contiguous() for k, t in sd.items() if assign[k] == i}
        if not part:
            raise RuntimeError(f"shard {name} would be empty; use fewer than {shards} shards")
        save_file(part, str(dst / name), metadata={"format": "pt"})
    index = {
        "metadata": {**metadata, "total_size": sum(_nbytes(t) for t in sd.values())},
        "weight_map": {k: names[assign[k]] for k in sorted(sd)},
    }
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_side_files(dst: Path, family: str, seed: int, config: dict[str, Any], gen: dict[str, Any]) -> None:
    """config.json, generation_config.json and fake tokenizer files a conversion must carry over."""
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if gen:
        (dst / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"tok{i}": i for i in range(3, 40)})
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": c,
                "special": True,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
            }
            for c, i in list(vocab.items())[:3]
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "recast_fixture": {"family": family, "seed": seed},
    }
    (dst / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2) + "\n")
    tok_cfg = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def _finish(
    dst: Path,
    family: str,
    seed: int,
    sd: dict[str, torch.Tensor],
    config: dict[str, Any],
    gen: dict[str, Any],
    shards: int,
    mutate_assign: Callable[[dict[str, int]], None] | None,
    rename: Callable[[str], str] | None = None,
) -> Path:
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    dst.mkdir(parents=True, exist_ok=True)
    assign = _assign_shards(sd, shards)
    if mutate_assign is not None:
        mutate_assign(assign)
    if rename is not None:
        sd = {rename(k): t for k, t in sd.items()}
        assign = {rename(k): i for k, i in assign.items()}
    _write_shards(
        dst, sd, assign, shards, TINY_FAMILIES[family].index_metadata if family in TINY_FAMILIES else {}
    )
    _write_side_files(dst, family, seed, config, gen)
    return dst


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def build_checkpoint(
    dst: Path,
    family: str,
    *,
    scheme: str = "per-tensor",
    tied: bool = False,
    layout: str = "default",
    seed: int = 0,
    shards: int = 3,
    split_scales: bool = True,
) -> Path:
    """Write a vendor-style FP8 checkpoint of ``family`` into ``dst`` and return ``dst``.

    ``scheme``: "per-tensor" (static activation scales), "per-expert" (mistral4 families; [E,1,1]
    scales on the 3-D experts) or "block" (128x128). ``layout`` re-spells keys (see ``LAYOUTS``).
    ``split_scales`` (needs ``shards >= 2``) puts at least two scales and one activation scale in a
    different shard than their weights and, for DeepSeek, one expert of layer 1 in another shard than
    its siblings, so work units must be gathered through the index.
    """
    _check_args(family, layout, scheme)
    dst = Path(dst)
    plain, config, gen = _saved_model(family, layout, tied, seed)
    if scheme == "mxfp4":
        sd, qcfg = mxfp4_state_dict(plain), MXFP4_CONFIG
    elif scheme == "fp8-mxfp4":
        sd = mimo_v26_state_dict(quantize_state_dict(plain, family, "block", seed), plain)
        qcfg = _quantization_config("block", list(sd), sd, family)
    elif scheme == "mxfp4-ct":
        sd = kimi_k3_state_dict(plain)
        qcfg = k3_quantization_config(list(sd))
    elif scheme == "fp8-v41":
        sd, qcfg = deepseek_v41_state_dict(plain), V41_CONFIG
        config = {**config, "text_config": {**config["text_config"], "quantization_config": qcfg}}
    elif scheme.startswith("fp8-v4"):
        sd, qcfg = deepseek_v4_state_dict(plain, fp4_experts=scheme == "fp8-v4"), V4_CONFIG
        config = {**config, "expert_dtype": "fp4" if scheme == "fp8-v4" else "fp8"}
    else:
        sd = quantize_state_dict(plain, family, scheme, seed)
        qcfg = _quantization_config(scheme, list(sd), sd, family)
    config = dict(config)
    config["quantization_config"] = qcfg
    if "text_config" in config:
        config["text_config"] = {**config["text_config"], "quantization_config": qcfg}

    def split(assign: dict[str, int]) -> None:
        _split_work_units(sd, assign, shards)

    return _finish(dst, family, seed, sd, config, gen, shards, split if split_scales else None)


# --------------------------------------------------------------------------------------------------
# compressed-tensors (llm-compressor's spelling of the same FP8 numbers)
# --------------------------------------------------------------------------------------------------


def _ct_rename(sd: dict[str, torch.Tensor]) -> Callable[[str], str]:
    """Vendor names → compressed-tensors names: ``K_scale_inv`` → ``K_scale``, activation scales →
    ``X.input_scale`` / ``K_input_scale``; the values are the same dequantization multipliers."""
    acts = {activation_scale_key(k): k for k in sd if activation_scale_key(k) in sd}

    def rename(key: str) -> str:
        if key.endswith("_scale_inv"):
            return key[: -len("_inv")]
        if key in acts:
            w = acts[key]
            return w[: -len(".weight")] + ".input_scale" if w.endswith(".weight") else w + "_input_scale"
        return key

    return rename


def _ct_args(strategy: str, dynamic: bool, **extra: Any) -> dict[str, Any]:
    args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": dynamic}
    return {**args, "group_size": None, "block_structure": None, "actorder": None, **extra}


def ct_quantization_config(scheme: str, ignore: list[str]) -> dict[str, Any]:
    """What llm-compressor writes for FP8 (static), FP8_DYNAMIC and FP8_BLOCK."""
    weights = {
        "per-tensor": _ct_args("tensor", False),
        "per-channel": _ct_args("channel", False),
        "block": _ct_args("block", False, block_structure=[BLOCK, BLOCK]),
    }[scheme]
    acts = {
        "per-tensor": _ct_args("tensor", False),
        "per-channel": _ct_args("token", True),
        "block": _ct_args("group", True, group_size=BLOCK),
    }[scheme]
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts, "format": None}
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def build_compressed_tensors(
    dst: Path,
    family: str,
    *,
    scheme: str = "per-tensor",
    zero_points: bool = False,
    seed: int = 0,
    shards: int = 3,
) -> Path:
    """The model of ``build_checkpoint`` (same seed, same FP8 bytes and scale values) in the
    compressed-tensors layout. Per-tensor scales are stored ``[1]``; ``zero_points`` adds the all-zero
    ``weight_zero_point`` tensors some writers emit for symmetric schemes."""
    _check_args(family, "default", scheme)
    if scheme == "per-expert":
        raise ValueError("compressed-tensors has no per-expert strategy")
    dst = Path(dst)
    plain, config, gen = _saved_model(family, "default", False, seed)
    sd = quantize_state_dict(plain, family, scheme, seed)
    for k in list(sd):
        if k.endswith("_scale_inv") and sd[k].dim() == 0:
            sd[k] = sd[k].reshape(1)
    if zero_points:
        for k in [k for k in sd if k.endswith("_scale_inv")]:
            sd[k[: -len("_scale_inv")] + "_zero_point"] = torch.zeros(sd[k].shape, dtype=FP8_DTYPE)
    ignore = _quantization_config(scheme, list(sd), sd, family)["modules_to_not_convert"]
    qcfg = ct_quantization_config(scheme, ignore)
    config = {**config, "quantization_config": qcfg}
    if "text_config" in config:
        config["text_config"] = {**config["text_config"], "quantization_config": qcfg}

    def split(assign: dict[str, int]) -> None:
        for k in [k for k in assign if k.endswith("_zero_point")]:
            assign[k] = assign[k[: -len("_zero_point")]]
        _split_work_units(sd, assign, shards)

    return _finish(dst, family, seed, sd, config, gen, shards, split, _ct_rename(sd))


# What NVIDIA's ModelOpt writes beside the shards (hf_quant_config.json) and, as quant_method modelopt,
# into config.json, for its FP8 (per-tensor, static) algorithm.
MODELOPT_PRODUCER = {"name": "modelopt", "version": "0.37.0"}


def build_modelopt(dst: Path, family: str, *, seed: int = 0, shards: int = 3) -> Path:
    """The model of ``build_checkpoint(scheme="per-tensor")`` (same FP8 bytes and scale values) as
    ModelOpt exports FP8: compressed-tensors' names (``X.weight_scale``, ``X.input_scale``) with 0-d
    scales, ``quantization_config`` ``{quant_method: modelopt, quant_algo: FP8, exclude_modules}`` and the
    same facts in ``hf_quant_config.json``."""
    _check_args(family, "default", "per-tensor")
    dst = Path(dst)
    plain, config, gen = _saved_model(family, "default", False, seed)
    sd = quantize_state_dict(plain, family, "per-tensor", seed)
    for k in list(sd):
        if k.endswith(("_scale_inv", "activation_scale")):
            sd[k] = sd[k].reshape(())
    exclude = _quantization_config("per-tensor", list(sd), sd, family)["modules_to_not_convert"]
    quantization = {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": exclude}
    config = {**config, "quantization_config": {"quant_method": "modelopt", **quantization}}

    def split(assign: dict[str, int]) -> None:
        _split_work_units(sd, assign, shards)

    _finish(dst, family, seed, sd, config, gen, shards, split, _ct_rename(sd))
    hf_quant = {"producer": MODELOPT_PRODUCER, "quantization": quantization}
    (dst / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4))
    return dst


def build_plain(
    dst: Path,
    family: str,
    *,
    tied: bool = False,
    layout: str = "default",
    seed: int = 0,
    shards: int = 3,
) -> Path:
    """The same model as ``build_checkpoint`` (same seed → same values) saved unquantized in bf16."""
    _check_args(family, layout)
    dst = Path(dst)
    sd, config, gen = _saved_model(family, layout, tied, seed)
    return _finish(dst, family, seed, sd, config, gen, shards, None)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (all shards named by its index, else all files)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [path / f for f in files]
    else:
        paths = sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for p in paths:
        part = load_file(p)
        dup = set(part) & set(out)
        if dup:
            raise ValueError(f"{p.name} repeats keys already seen in another shard: {sorted(dup)[:5]}")
        out.update(part)
    return out


def load_config(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory."""
    return json.loads((Path(path) / "config.json").read_text())
