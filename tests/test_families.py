"""The families added as data (issue 12): detection from the table alone, overrides, fresh quantization.

Their conversions are compared with NeMo AutoModel's own adapters in test_nemo_oracle.py; this file checks
what NeMo cannot tell us: which adapter a config and its keys select, that an adapter writing the same
bytes may be forced while one that would not is refused, and that the dense families quantize bf16
checkpoints exactly as tests/reference.py says.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import reference
import torch
from checkpoints import load_state_dict
from helpers import assert_state_dicts_identical, config, replace_tensor
from safetensors.torch import load_file, save_file

from worker.engine import api
from worker.engine.adapters import detect
from worker.engine.checkpoint import MANIFEST, SIDECAR
from worker.engine.errors import AdapterMismatchError, CheckpointError, RecastError, UnsupportedModelError

_SPLIT = ["model.layers.1.mlp.experts.0.gate_proj.weight", "model.layers.1.mlp.experts.0.down_proj.weight"]
_DENSE = ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.input_layernorm.weight"]
_STEP = ["model.layers.1.moe.gate_proj.weight", "model.layers.1.moe.down_proj.weight"]
_MINIMAX = [
    "model.layers.0.block_sparse_moe.experts.0.w1.weight",
    "model.layers.0.block_sparse_moe.gate.weight",
]


@pytest.mark.parametrize(
    "cfg,keys,expected",
    [
        ({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}, _SPLIT, "deepseek-v3"),
        ({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2"}, _SPLIT, "kimi-k2"),
        ({"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32"}, _SPLIT, "deepseek-v32"),
        ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}, _DENSE + _SPLIT, "qwen3-moe"),
        ({"model_type": "glm4_moe"}, _SPLIT, "glm4-moe"),
        ({"architectures": ["Glm4MoeLiteForCausalLM"]}, _SPLIT, "glm4-moe"),
        ({"architectures": ["GlmMoeDsaForCausalLM"]}, _SPLIT, "glm-moe-dsa"),
        ({"architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2"}, _MINIMAX, "minimax-m2"),
        (
            {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"},
            ["layers.1.ffn.experts.0.w1.weight", "layers.1.attn.wq_a.weight", "mtp.0.e_proj.weight"],
            "deepseek-v4",
        ),
        ({"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"},
         ["backbone.layers.1.mixer.experts.0.up_proj.weight", "backbone.layers.0.mixer.A_log"], "nemotron-v3"),
        ({"architectures": ["InklingForConditionalGeneration"], "model_type": "inkling_mm_model",
          "text_config": {"model_type": "inkling_text"}},
         ["model.llm.layers.0.mlp.experts.w13_weight", "model.llm.layers.0.attn.wq_du.weight"], "inkling"),
        ({"architectures": ["MiniMaxM3SparseForConditionalGeneration"], "model_type": "minimax_m3_vl",
          "text_config": {"model_type": "minimax_m3_vl_text"}}, [f"language_model.{k}" for k in _MINIMAX],
         "minimax-m3"),
        ({"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
          "text_config": {"model_type": "qwen3_5_moe_text"}}, _SPLIT, "qwen3.5-moe"),
        ({"architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text"}, _SPLIT, "qwen3.5-moe"),
        ({"model_type": "qwen3_5_moe"}, ["model.layers.1.mlp.experts.gate_up_proj"], "qwen3.5-moe"),
        ({"architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash"}, _SPLIT, "mimo-v2-flash"),
        ({"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41",
          "text_config": {"model_type": "deepseek_v41_text"}},
         ["layers.1.ffn.experts.0.w1.weight", "layers.1.engram.embed.weight"], "deepseek-v4.1"),
        ({"architectures": ["MiMoV2ForCausalLM"], "model_type": "mimo_v2"},
         ["model.layers.0.self_attn.qkv_proj.weight", *_SPLIT], "mimo-v2"),
        # Kimi K3 and Kimi Linear share the text model_type (and the expert layout); the architecture decides
        ({"architectures": ["KimiK3ForConditionalGeneration"], "model_type": "kimi_k3",
          "text_config": {"model_type": "kimi_linear"}}, [f"language_model.{k}.weight_packed" for k in _MINIMAX[:1]],
         "kimi-k3"),
        ({"architectures": ["KimiK3ForCausalLM"], "model_type": "kimi_linear"}, _MINIMAX, "kimi-k3"),
        ({"architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear"}, _MINIMAX, "kimi-linear"),
        ({"model_type": "kimi_linear"}, _MINIMAX, "kimi-linear"),
        ({"architectures": ["MiMoV25ForCausalLM"], "model_type": "mimo_v2"},
         ["model.layers.0.self_attn.qkv_proj.weight", *_SPLIT], "mimo-v2.5-pro"),
        ({"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
          "text_config": {"model_type": "qwen3_5_text"}}, [*_DENSE, "model.language_model.layers.0.linear_attn.A_log"],
         "qwen3.5"),
        ({"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text"}, _DENSE, "qwen3.5"),
        ({"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next"},
         [*_SPLIT, "model.layers.0.linear_attn.A_log"], "qwen3-next"),
        ({"architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
          "text_config": {"model_type": "qwen3_vl_moe_text"}},
         ["model.language_model.layers.0.mlp.experts.gate_up_proj"], "qwen3-vl-moe"),
        # Mistral 4's aggregated experts share the hf name; the architecture decides
        ({"architectures": ["Mistral4ForCausalLM"], "model_type": "mistral4"},
         ["model.layers.1.mlp.experts.gate_up_proj"], "mistral4"),
        ({"architectures": ["Glm5NextForConditionalGeneration"], "model_type": "glm5_next"},
         ["model.language_model.layers.1.mlp.experts.0.gate_proj.weight",
          "model.language_model.layers.0.self_attn.A_log"], "glm5-next"),
        # another family's router bias and A_log are not claimed by glm5-next's fp32 rules
        ({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"},
         [*_SPLIT, "model.layers.1.mlp.gate.e_score_correction_bias"], "deepseek-v3"),
        # gpt-oss: MXFP4 blocks, or a bf16 release whose experts share Mistral 4's hf name
        ({"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss"},
         ["model.layers.0.mlp.experts.gate_up_proj_blocks", "model.layers.0.mlp.router.weight"], "gpt-oss"),
        ({"model_type": "gpt_oss"}, ["model.layers.0.mlp.experts.gate_up_proj"], "gpt-oss"),
        ({"architectures": ["Step3p5ForCausalLM"], "model_type": "step3p5"}, _STEP, "step3p5"),
        ({"architectures": ["Step3p7ForConditionalGeneration"], "model_type": "step3p7",
          "text_config": {"model_type": "step3p5"}}, _STEP, "step3p7"),
        ({"model_type": "step3p5"}, _STEP, "step3p5"),
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, _DENSE, "llama"),
        ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}, _DENSE, "qwen3"),
        ({"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}, _DENSE, "gemma3"),
        ({"model_type": "gemma3_text"}, _DENSE, "gemma3"),
        ({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
          "text_config": {"model_type": "gemma3_text"}}, _DENSE, "gemma3-vlm"),
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, _DENSE, "mistral3-fp8"),
    ],
)  # fmt: skip
def test_detection_reads_the_table(cfg, keys, expected) -> None:
    assert detect(cfg, keys).name == expected


@pytest.mark.parametrize(
    "cfg,keys",
    [
        # a dense architecture whose keys hold another family's experts
        ({"architectures": ["LlamaForCausalLM"]}, _DENSE + _SPLIT),
        ({"architectures": ["Qwen3MoeForCausalLM"]}, _MINIMAX),
        ({"architectures": ["Qwen3MoeForCausalLM"]}, _SPLIT + _STEP),
        # the architecture of one family with the model type of another
        ({"architectures": ["Qwen3ForCausalLM"], "model_type": "llama"}, _DENSE),
        ({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "qwen3_moe"}, _SPLIT),
        ({"architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_moe"}, _SPLIT),
    ],
)
def test_contradicting_checkpoints_are_refused(cfg, keys) -> None:
    with pytest.raises(UnsupportedModelError, match="not supported"):
        detect(cfg, keys)


def test_a_model_type_no_family_claims_contradicts_nothing() -> None:
    assert detect({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe_v9"}, _SPLIT).name == (
        "qwen3-moe"
    )


def _files(path: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
        if p.is_file() and p.name not in (SIDECAR, MANIFEST)
    }


@pytest.mark.parametrize("family", ["qwen3-moe", "glm4-moe", "kimi-k2"])
def test_deepseek_adapter_writes_what_the_family_adapter_writes(family, checkpoint, tmp_path: Path) -> None:
    # Before these families were declared, --adapter deepseek-v3 was the workaround; it still works.
    src = checkpoint(family, scheme="block")
    api.convert(src, tmp_path / "detected", api.Options(to="native"))
    report = api.convert(src, tmp_path / "forced", api.Options(to="native", adapter="deepseek-v3"))
    assert report.passed and _files(tmp_path / "forced") == _files(tmp_path / "detected")


def test_an_adapter_with_other_expert_rules_is_refused(checkpoint, tmp_path: Path) -> None:
    with pytest.raises(AdapterMismatchError, match="minimax-m2"):
        api.convert(checkpoint("minimax-m2", scheme="block"), tmp_path / "n", api.Options(to="native",
                    adapter="qwen3-moe"))  # fmt: skip
    assert not (tmp_path / "n").exists()


# Weights a family keeps in bf16 beyond reference.py's rules: MiniMax's router is block_sparse_moe.gate
# (NeMo's rule); Qwen3-Next's small GatedDeltaNet projections and shared-expert gate, as Qwen's releases.
_KEPT_BF16 = {
    "minimax-m2": ("block_sparse_moe.gate.weight",),
    "qwen3-next": ("shared_expert_gate.weight", "conv1d.weight", "in_proj_ba.weight"),
}


@pytest.mark.parametrize(
    "family", ["llama", "qwen3", "gemma3", "gemma3-vlm", "qwen3-moe", "minimax-m2", "qwen3-next"]
)
def test_fresh_block_quantization_matches_reference(family, plain_checkpoint, tmp_path: Path) -> None:
    src = plain_checkpoint(family)
    out = tmp_path / "fp8"
    report = api.convert(src, out, api.Options(to="hf", quantize="block"))
    s = report.summary()
    assert report.passed and s["bounded"] > 0 and s["bounded_within"] == s["bounded"]
    want = reference.quantize_state_dict(load_state_dict(src), "block")
    if kept := _KEPT_BF16.get(family):
        scales = [k for k in want if k.endswith(tuple(f"{end}_scale_inv" for end in kept))]
        assert len({k.rsplit(".", 2)[-2] for k in scales}) == len(kept), scales
        for scale in scales:
            del want[scale]
            want[scale[: -len("_scale_inv")]] = load_state_dict(src)[scale[: -len("_scale_inv")]]
    assert_state_dicts_identical(load_state_dict(out), want)
    assert config(out)["quantization_config"]["weight_block_size"] == [128, 128]
    api.convert(out, tmp_path / "native", api.Options(to="native"))
    api.convert(tmp_path / "native", tmp_path / "back", api.Options(to="hf"))
    assert_state_dicts_identical(load_state_dict(tmp_path / "back"), load_state_dict(out))


def test_step3p7_with_mtp_layers_is_refused(checkpoint, tmp_path: Path) -> None:
    # NeMo's Step3p7 adapter renumbers the MTP layers after num_hidden_layers into mtp.layers.{i}; the
    # table has no rule for that, so such a checkpoint is refused rather than written under other names.
    src = tmp_path / "src"
    shutil.copytree(checkpoint("step3p7", scheme="block"), src)
    cfg = config(src)
    cfg["text_config"]["num_nextn_predict_layers"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"num_nextn_predict_layers=1.*mtp\.layers"):
        api.convert(src, tmp_path / "native", api.Options(to="native"))
    assert not (tmp_path / "native").exists()


def test_a_variant_is_never_detected_and_taken_only_on_its_family(checkpoint, tmp_path: Path) -> None:
    # mimo-v2-flash-te writes NeMo's Transformer Engine names; detection keeps the default layout.
    mimo = {"architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash"}
    assert detect(mimo, _SPLIT).name == "mimo-v2-flash"
    with pytest.raises(AdapterMismatchError, match="deepseek-v3"):
        api.convert(checkpoint("deepseek-v3", scheme="block"), tmp_path / "n", api.Options(to="native",
                    adapter="mimo-v2-flash-te"))  # fmt: skip
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize(
    "heads,kv_heads,message",
    [
        # 384 | 64 | 64 rows: the right total, but k and v start inside a 128-row scale block
        (6, 1, r"query_key_value\.weight.*block-scaled FP8.*rows \[384, 448\], inside a block"),
        # 128 | 64 | 64 rows: not the tensor's 512
        (2, 1, r"query_key_value\.weight.*has shape \[512, 160\].*= 256 rows"),
    ],
)
def test_a_split_off_the_config_or_the_scale_blocks_is_refused(
    heads, kv_heads, message, checkpoint, tmp_path: Path
) -> None:
    # Ling's fused q | k | v splits by head counts from config.json; block-FP8 scales split with it only
    # on 128-row boundaries. Either mismatch is refused while planning, naming the tensor, nothing written.
    src = tmp_path / "src"
    shutil.copytree(checkpoint("ling-v2", scheme="block"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(
        json.dumps({**cfg, "num_attention_heads": heads, "num_key_value_heads": kv_heads})
    )
    with pytest.raises(CheckpointError, match=message):
        api.convert(src, tmp_path / "native", api.Options(to="native"))
    assert not (tmp_path / "native").exists() or not any((tmp_path / "native").iterdir())


@pytest.mark.parametrize(
    "kv_heads,message",
    [
        # one shard: the [4, 2] per-shard scale is not the [3, 2] of one grid over 304 rows
        (1, r"scale of 'model\.layers\.\d\.self_attn\.qkv_proj\.weight' has shape \[4, 2\].*128x128 blocks"),
        # four shards of 76 rows would need [4, 2] too, but two of 152 fit it first: ambiguous, refused
        (4, r"qkv_proj\.weight' \[4, 2\] also fits fewer than 4 row shards.*ambiguous"),
    ],
)
def test_a_sharded_scale_grid_that_does_not_fit_the_config_is_refused(
    kv_heads, message, checkpoint, tmp_path: Path
) -> None:
    # MiMo-V2.5-Pro's fused qkv_proj is saved as num_key_value_heads shards, each with its own block grid;
    # a config.json that names another shard count does not fit the scales, and nothing is written.
    src = tmp_path / "src"
    shutil.copytree(checkpoint("mimo-v2.5-pro", scheme="block"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": kv_heads}))
    with pytest.raises(CheckpointError, match=message):
        api.convert(src, tmp_path / "native", api.Options(to="native"))
    assert not (tmp_path / "native").exists() or not any((tmp_path / "native").iterdir())


def test_uint8_codes_with_a_scale_their_format_does_not_pair_are_refused(checkpoint, tmp_path: Path) -> None:
    # The vendors' fp8 format pairs uint8 FP4 codes K.weight with K.weight_scale (MiMo-V2.6's experts);
    # DeepSeek-V4's spells its scales K.scale. There such a pair is refused by name, never copied on as if
    # the codes were weights.
    src = tmp_path / "src"
    shutil.copytree(checkpoint("deepseek-v4", scheme="fp8-v4"), src)
    key = "layers.1.attn.wq_a.weight"
    rows, cols = load_state_dict(src)[key].shape
    replace_tensor(src, "layers.1.attn.wq_a.scale", {})
    codes = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8)
    replace_tensor(
        src, key, {key: codes, key + "_scale": torch.full((rows, cols // 32), 127, dtype=torch.uint8)}
    )
    with pytest.raises(
        CheckpointError, match=r"wq_a\.weight' in .* is U8 with a scale '.*wq_a\.weight_scale'"
    ):
        api.convert(src, tmp_path / "native", api.Options(to="native"))
    assert not (tmp_path / "native").exists() or not any((tmp_path / "native").iterdir())


def test_a_split_names_the_config_field_it_lacks(checkpoint, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(checkpoint("ling-v2", scheme="block"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "head_dim"}))
    with pytest.raises(UnsupportedModelError, match=r"config\.json lacks the integer 'head_dim'"):
        api.convert(src, tmp_path / "native", api.Options(to="native"))


def test_a_fused_qkv_bias_is_refused(checkpoint, tmp_path: Path) -> None:
    # NeMo's Ling adapter splits query_key_value.weight only; a fused bias would reach q/k/v_proj unsplit.
    src = tmp_path / "src"
    shutil.copytree(checkpoint("ling-v2", scheme="block"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "use_qkv_bias": True}))
    with pytest.raises(UnsupportedModelError, match=r"use_qkv_bias=True: adapter 'ling-v2' does not map"):
        api.convert(src, tmp_path / "native", api.Options(to="native"))


def test_a_fresh_block_quantization_across_split_points_inside_a_block(
    plain_checkpoint, tmp_path: Path
) -> None:
    # The bf16 Ling with config.json asking for 384 | 64 | 64 rows: k and v start inside a 128-row block.
    # Splitting bf16 needs no scales, so it converts; a fresh block quantization of the native checkpoint
    # gives the fused tensor one scale grid, its rows 384-512 read from both pieces (checked in flight and
    # by recast verify, which decodes v's rows from inside their block); that FP8 release cannot be split
    # again, and says so; the bf16 way back is byte for byte.
    src = tmp_path / "src"
    shutil.copytree(plain_checkpoint("ling-v2"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 6, "num_key_value_heads": 1}))
    native = tmp_path / "native"
    assert api.convert(src, native, api.Options(to="native")).passed
    sd = load_state_dict(native)
    assert [sd[f"model.layers.1.self_attn.{p}_proj.weight"].shape[0] for p in "qkv"] == [384, 64, 64]
    fp8 = tmp_path / "fp8"
    assert api.convert(native, fp8, api.Options(to="hf", quantize="block")).passed
    assert api.verify(native, fp8).passed
    assert load_state_dict(fp8)["model.layers.1.attention.query_key_value.weight_scale_inv"].shape == (4, 2)
    with pytest.raises(CheckpointError, match=r"rows \[384, 448\], inside a block"):
        api.convert(fp8, tmp_path / "again", api.Options(to="native"))
    api.convert(native, tmp_path / "back", api.Options(to="hf"))
    assert_state_dicts_identical(load_state_dict(tmp_path / "back"), load_state_dict(src))


def test_mxfp8_native_goes_out_in_bf16_or_fresh_fp8(checkpoint, tmp_path: Path) -> None:
    # MXFP8 weights are ordinary weights once dequantized (unlike MXFP4's [E, out, in] experts): a native
    # checkpoint of MiniMax-M3 goes back to its own MXFP8 bytes (test_nemo_oracle), and also to bf16 (its
    # native values, exactly) and to fresh 128x128 blocks within the e4m3 bound.
    native = tmp_path / "native"
    assert api.convert(checkpoint("minimax-m3", scheme="mxfp8"), native, api.Options(to="native")).passed
    values = load_state_dict(native)
    bf16 = tmp_path / "bf16"
    assert api.convert(native, bf16, api.Options(to="hf", quantize="none")).passed
    q = "model.layers.1.self_attn.q_proj.weight"
    got = load_state_dict(bf16)
    assert not [k for k in got if k.endswith("_scale_inv")] and "quantization_config" not in config(bf16)
    assert_state_dicts_identical({q: got[f"language_model.{q}"]}, {q: values[q]})
    block = tmp_path / "block"
    s = api.convert(native, block, api.Options(to="hf", quantize="block")).summary()
    assert s["bounded"] > 0 and s["bounded_within"] == s["bounded"]
    assert load_state_dict(block)[f"language_model.{q}_scale_inv"].shape == (1, 1)
    assert config(block)["quantization_config"]["weight_block_size"] == [128, 128]


@pytest.mark.parametrize(
    "dtype,shape,message",
    [
        (torch.uint8, (64, 2), r"scale of .*q_proj\.weight. is U8 \[64, 2\].*\[64, 3\] \(one per 32 columns"),
        (
            torch.float8_e8m0fnu,
            (64, 2),
            r"is F8_E8M0 \[64, 2\].*\[64, 3\] \(one per 32 columns.*\[1, 1\] \(per block",
        ),
    ],
)
def test_a_malformed_mxfp8_scale_is_refused_by_name(
    checkpoint, tmp_path: Path, dtype, shape, message
) -> None:
    src = tmp_path / "src"
    shutil.copytree(checkpoint("minimax-m3", scheme="mxfp8"), src)
    scale = "language_model.model.layers.1.self_attn.q_proj.weight_scale_inv"
    replace_tensor(src, scale, {scale: torch.full(shape, 127, dtype=torch.uint8).view(dtype)})
    with pytest.raises(CheckpointError, match=message):
        api.convert(src, tmp_path / "native", api.Options(to="native"))
    assert not (tmp_path / "native").exists()


def test_fresh_scales_go_on_matrices_only(checkpoint, tmp_path: Path) -> None:
    # Nemotron-H's final norm is backbone.norm_f.weight, which no norm pattern names: a fresh block
    # quantization still leaves it (and every 1-D weight) in bf16, and the matrices get their scales.
    native = tmp_path / "native"
    assert api.convert(checkpoint("nemotron-v3", scheme="block"), native, api.Options(to="native")).passed
    out = tmp_path / "fp8"
    assert api.convert(native, out, api.Options(to="hf", quantize="block")).passed
    got = load_state_dict(out)
    assert got["backbone.norm_f.weight"].dtype == torch.bfloat16
    assert not [k for k, t in got.items() if t.dtype == torch.float8_e4m3fn and t.dim() < 2]
    assert got["backbone.layers.2.mixer.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert "backbone.norm_f" in config(out)["quantization_config"]["modules_to_not_convert"]


def test_deepseek_v4_block_scales_go_to_another_format_as_fp32(checkpoint, tmp_path: Path) -> None:
    # DeepSeek-V4's e8m0 block scales (F8_E8M0, spelled K.scale) kept in the vendors' fp8 spelling become
    # fp32 K.weight_scale_inv with the same values (powers of two, exact), codes unchanged; that checkpoint
    # converts to the same native bits. V4-Flash's FP4 experts are written only in their own format.
    src = checkpoint("deepseek-v4", scheme="fp8-v4-base")
    native = tmp_path / "native"
    assert api.convert(src, native, api.Options(to="native")).passed
    out = tmp_path / "fp8"
    assert api.convert(native, out, api.Options(to="hf", quantize="keep", format="fp8")).passed
    source, got = load_state_dict(src), load_state_dict(out)
    key = "layers.1.ffn.experts.2.w2"
    assert got[f"{key}.weight_scale_inv"].dtype == torch.float32 and f"{key}.scale" not in got
    assert torch.equal(got[f"{key}.weight_scale_inv"], source[f"{key}.scale"].float())
    assert torch.equal(got[f"{key}.weight"].view(torch.uint8), source[f"{key}.weight"].view(torch.uint8))
    again = tmp_path / "again"
    assert api.convert(out, again, api.Options(to="native")).passed
    assert_state_dicts_identical(load_state_dict(again), load_state_dict(native))

    flash = tmp_path / "flash"
    assert api.convert(checkpoint("deepseek-v4", scheme="fp8-v4"), flash, api.Options(to="native")).passed
    with pytest.raises(RecastError, match=r"experts\.0\.w1\.weight.*fp4 scales.*leave --format unset"):
        api.convert(flash, tmp_path / "refused", api.Options(to="hf", quantize="keep", format="fp8"))
    assert not (tmp_path / "refused").exists()


def test_deepseek_v4_fp4_experts_go_out_in_bf16_or_fresh_fp8(checkpoint, tmp_path: Path) -> None:
    # V4-Flash's FP4 experts are ordinary per-expert weights once dequantized: bf16 exactly, or fresh
    # 128x128 FP8 blocks in the vendors' spelling, whose config.json then drops expert_dtype (transformers
    # would allocate FP4 experts from it); the way back in the release's own layout restores it.
    src = checkpoint("deepseek-v4", scheme="fp8-v4")
    native = tmp_path / "native"
    assert api.convert(src, native, api.Options(to="native")).passed
    expert = "layers.1.ffn.experts.1.w1.weight"
    values = load_state_dict(native)["model.layers.1.mlp.experts.gate_and_up_projs"][1, :, :96].T
    bf16 = tmp_path / "bf16"
    assert api.convert(native, bf16, api.Options(to="hf", quantize="none")).passed
    assert_state_dicts_identical({expert: load_state_dict(bf16)[expert]}, {expert: values.contiguous()})
    assert "expert_dtype" not in config(bf16) and "quantization_config" not in config(bf16)
    block = tmp_path / "block"
    s = api.convert(native, block, api.Options(to="hf", quantize="block", format="fp8")).summary()
    assert s["bounded"] > 0 and s["bounded_within"] == s["bounded"]
    assert load_state_dict(block)[expert].dtype == torch.float8_e4m3fn
    assert (
        "expert_dtype" not in config(block) and config(block)["quantization_config"]["quant_method"] == "fp8"
    )
    back = tmp_path / "back"
    assert api.convert(native, back, api.Options(to="hf")).passed
    assert (
        config(back)["expert_dtype"] == "fp4"
        and config(back)["quantization_config"] == config(src)["quantization_config"]
    )


@pytest.mark.parametrize(
    "family,where,field,message",
    [
        # NeMo folds Gemma 4 MoE's per_expert_scale into down_projs and writes ones on the way back
        ("gemma4", "text_config", "enable_moe_block", r"enable_moe_block=True.*gemma4.*per_expert_scale"),
    ],
)
def test_a_variant_nemo_maps_irreversibly_is_refused(
    family, where, field, message, checkpoint, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    shutil.copytree(checkpoint(family, scheme="block"), src)
    cfg = json.loads((src / "config.json").read_text())
    (cfg[where] if where else cfg)[field] = True
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=message):
        api.convert(src, tmp_path / "native", api.Options(to="native"))
    assert not (tmp_path / "native").exists()


def test_mxfp8_exponents_stored_as_f8_e8m0_read_as_uint8(checkpoint, tmp_path: Path) -> None:
    # The same MXFP8 checkpoint with its exponents stored as safetensors' F8_E8M0 (transformers' own ue8m0
    # spelling) rather than uint8: the same native bits, and back to its own F8_E8M0 bytes.
    u8 = checkpoint("minimax-m3", scheme="mxfp8")
    src = tmp_path / "src"
    shutil.copytree(u8, src)
    for shard in sorted(src.glob("*.safetensors")):
        tensors = load_file(shard)
        for k, t in tensors.items():
            if k.endswith("_scale_inv") and t.dtype == torch.uint8:
                tensors[k] = t.view(torch.float8_e8m0fnu)
        save_file(tensors, str(shard), metadata={"format": "pt"})
    assert api.convert(u8, tmp_path / "from_u8", api.Options(to="native")).passed
    assert api.convert(src, tmp_path / "native", api.Options(to="native")).passed
    assert_state_dicts_identical(load_state_dict(tmp_path / "native"), load_state_dict(tmp_path / "from_u8"))
    assert api.convert(tmp_path / "native", tmp_path / "back", api.Options(to="hf")).passed
    assert_state_dicts_identical(load_state_dict(tmp_path / "back"), load_state_dict(src))
