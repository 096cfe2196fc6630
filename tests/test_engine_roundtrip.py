"""The engine against the plain reference semantics, bit for bit, for every family and FP8 layout."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import reference
import torch
from checkpoints import load_state_dict
from helpers import assert_state_dicts_identical, config, flip_bits

from worker.engine import api
from worker.engine.checkpoint import SIDECAR

CASES = [
    ("mistral4", "per-tensor", "default", False),
    ("mistral4", "per-expert", "prefixed", True),
    ("mistral4", "block", "default", False),
    ("mistral4-vlm", "per-tensor", "default", False),
    ("mistral4-vlm", "per-expert", "default", True),
    ("mistral4-vlm", "block", "default", False),
    ("mistral3-fp8", "per-tensor", "default", False),
    ("mistral3-fp8", "per-tensor", "default", True),
    ("mistral3-fp8", "per-tensor", "identity", False),
    ("mistral3-fp8", "per-tensor", "causal", False),
    ("deepseek-v3", "block", "default", False),
    ("deepseek-v3", "per-tensor", "default", True),
]


def _id(case: tuple) -> str:
    return "-".join(str(c) if not isinstance(c, bool) else ("tied" if c else "untied") for c in case)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_hf_to_native_matches_reference_and_round_trips(case, checkpoint, tmp_path: Path) -> None:
    family, scheme, layout, tied = case
    src = checkpoint(family, scheme=scheme, layout=layout, tied=tied)
    native = tmp_path / "native"
    report = api.convert(src, native, api.Options(to="native"))
    assert report.passed and report.summary()["bitwise_equal"] == report.summary()["tensors_checked"]
    assert report.summary()["accounting"]["unaccounted"] == 0

    source_sd = load_state_dict(src)
    want = reference.hf_to_native(source_sd, config(src), family)
    assert_state_dicts_identical(load_state_dict(native), want)
    assert "quantization_config" not in config(native)
    assert "quantization_config" not in config(native).get("text_config", {})
    assert (native / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    sidecar = json.loads((native / SIDECAR).read_text())
    assert sidecar["verification"]["passed"] and sidecar["adapter"] == family
    assert set(sidecar["files"]) >= {"config.json", "model.safetensors.index.json"}

    back = tmp_path / "back"
    api.convert(native, back, api.Options(to="hf"))
    assert_state_dicts_identical(load_state_dict(back), source_sd)
    assert_state_dicts_identical(
        reference.native_to_hf_keep(load_state_dict(native), source_sd, config(src), family), source_sd
    )
    # keep restores the source's files byte for byte: shards, index, config with its quantization_config.
    for f in sorted(p.name for p in src.iterdir()):
        assert filecmp.cmp(src / f, back / f, shallow=False), f


@pytest.mark.parametrize("dtype,torch_dtype", [("fp32", torch.float32), ("fp16", torch.float16)])
def test_other_native_dtypes_round_trip(dtype, torch_dtype, checkpoint, tmp_path: Path) -> None:
    src = checkpoint("mistral4-vlm", scheme="block")
    native = tmp_path / "native"
    api.convert(src, native, api.Options(to="native", dtype=dtype))
    source_sd = load_state_dict(src)
    assert_state_dicts_identical(
        load_state_dict(native), reference.hf_to_native(source_sd, config(src), "mistral4-vlm", torch_dtype)
    )
    api.convert(native, tmp_path / "back", api.Options(to="hf"))
    assert_state_dicts_identical(load_state_dict(tmp_path / "back"), source_sd)


# Mistral 4's 3-D experts are refused fresh scales (transformers would misread them): tests/test_consumers.py
@pytest.mark.parametrize("mode", ["per-tensor", "block"])
@pytest.mark.parametrize("family", ["deepseek-v3", "mistral3-fp8"])
def test_fresh_quantization_matches_reference(family, mode, plain_checkpoint, tmp_path: Path) -> None:
    src = plain_checkpoint(family)
    out = tmp_path / "fp8"
    report = api.convert(src, out, api.Options(to="hf", quantize=mode))
    s = report.summary()
    assert report.passed and s["bounded"] > 0 and s["bounded_within"] == s["bounded"]
    assert_state_dicts_identical(
        load_state_dict(out), reference.quantize_state_dict(load_state_dict(src), mode)
    )
    qc = config(out)["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["activation_scheme"] == "dynamic"
    assert qc["weight_block_size"] == ([128, 128] if mode == "block" else None)
    # and the freshly quantized checkpoint converts to native and back bit for bit
    api.convert(out, tmp_path / "native", api.Options(to="native"))
    api.convert(tmp_path / "native", tmp_path / "back", api.Options(to="hf"))
    assert_state_dicts_identical(load_state_dict(tmp_path / "back"), load_state_dict(out))


def test_hf_dequantize_to_hf_is_lossless(checkpoint, tmp_path: Path) -> None:
    src = checkpoint("deepseek-v3", scheme="block")
    out = tmp_path / "bf16"
    report = api.convert(src, out, api.Options(to="hf", quantize="none"))
    assert report.passed and report.summary()["bounded"] == 0
    sd = load_state_dict(src)
    got = load_state_dict(out)
    assert not any(k.endswith("_scale_inv") for k in got)
    assert "quantization_config" not in config(out)
    want = reference.hf_to_native(sd, config(src), "deepseek-v3")
    # native stacks the experts, so compare the keys both layouts share
    shared = [k for k in got if k in want]
    assert len(shared) > 20
    assert_state_dicts_identical({k: got[k] for k in shared}, {k: want[k] for k in shared})


def test_native_to_fresh_fp8_is_bounded(checkpoint, tmp_path: Path) -> None:
    src = checkpoint("deepseek-v3", scheme="per-tensor")
    api.convert(src, tmp_path / "native", api.Options(to="native"))
    report = api.convert(tmp_path / "native", tmp_path / "block", api.Options(to="hf", quantize="block"))
    s = report.summary()
    assert report.passed and s["worst_bound_ratio"] <= 1.0
    got = load_state_dict(tmp_path / "block")
    # an expert split back out of NeMo's stacked tensor: [96, 160] takes a [1, 2] block grid
    assert got["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"].shape == (1, 2)
    assert config(tmp_path / "block")["quantization_config"]["weight_block_size"] == [128, 128]


def test_verify_detects_a_flipped_byte(checkpoint, tmp_path: Path) -> None:
    src = checkpoint("mistral4", scheme="block")
    native = tmp_path / "native"
    api.convert(src, native, api.Options(to="native"))
    assert api.verify(src, native).passed
    flip_bits(native, "model.layers.1.mlp.experts.gate_and_up_projs", 101, 0x40)
    with pytest.raises(api.VerificationError) as err:
        api.verify(src, native)
    assert "model.layers.1.mlp.experts.gate_up_proj" in str(err.value)
