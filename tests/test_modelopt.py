"""ModelOpt FP8 (NVIDIA's Nemotron 3 FP8 releases) in, and back byte for byte.

ModelOpt's per-tensor FP8 stores the dequantization multiplier under compressed-tensors' names, so a
ModelOpt checkpoint must convert to exactly the native bits its compressed-tensors twin gives (whose
reading the compressed-tensors package vouches for, tests/test_compressed_tensors.py), and those are
NeMo's Nemotron-H adapter applied to ``q · s``: neither vLLM nor TensorRT-LLM, ModelOpt's consumers, is a
test dependency, so the definition is the yardstick for the arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path

import nemo_oracle
import pytest
import torch
from checkpoints import build_compressed_tensors, build_modelopt, load_state_dict
from helpers import assert_state_dicts_identical, config

from worker.engine import api
from worker.engine.errors import CheckpointError, RecastError


@pytest.fixture(scope="module")
def modelopt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_modelopt(tmp_path_factory.mktemp("modelopt") / "ckpt", "nemotron-v3")


@pytest.mark.nemo
def test_modelopt_converts_as_its_twin_and_as_nemo(modelopt: Path, tmp_path: Path) -> None:
    src_sd = load_state_dict(modelopt)
    assert src_sd["backbone.layers.2.mixer.q_proj.weight_scale"].shape == ()
    report = api.convert(modelopt, tmp_path / "native", api.Options(to="native"))
    assert report.passed and report.adapter == "nemotron-v3"
    got = load_state_dict(tmp_path / "native")

    twin = build_compressed_tensors(tmp_path / "ct", "nemotron-v3", scheme="per-tensor")
    assert api.convert(twin, tmp_path / "ct-native", api.Options(to="native")).passed
    assert_state_dicts_identical(got, load_state_dict(tmp_path / "ct-native"))

    nemo_oracle.load()
    scales = {k for k in src_sd if k.endswith(("_scale", "input_scale"))}
    values = {
        k: (t.float() * src_sd[k + "_scale"].float()).to(torch.bfloat16)
        if t.dtype == torch.float8_e4m3fn
        else t
        for k, t in src_sd.items()
        if k not in scales
    }
    adapter = nemo_oracle.moe_adapter(
        "nemotron_v3.NemotronV3StateDictAdapter", config(modelopt), torch.bfloat16
    )
    assert_state_dicts_identical(got, adapter.from_hf(values))


def test_modelopt_comes_back_byte_for_byte(modelopt: Path, tmp_path: Path) -> None:
    assert api.convert(modelopt, tmp_path / "native", api.Options(to="native")).passed
    assert api.convert(tmp_path / "native", tmp_path / "back", api.Options(to="hf")).passed
    for shard in sorted(modelopt.glob("*.safetensors")):
        assert (tmp_path / "back" / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert (
        json.loads((tmp_path / "back" / "hf_quant_config.json").read_text())["quantization"]["quant_algo"]
        == "FP8"
    )
    assert config(tmp_path / "back")["quantization_config"] == config(modelopt)["quantization_config"]


def test_other_modelopt_algorithms_are_refused_by_name(modelopt: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for f in modelopt.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    cfg = config(src)
    cfg["quantization_config"]["quant_algo"] = "NVFP4"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"quant_algo 'NVFP4' \(ModelOpt\) is not supported"):
        api.convert(src, tmp_path / "native", api.Options(to="native"))
    assert not (tmp_path / "native").exists()


def test_modelopt_is_written_only_to_restore(modelopt: Path, tmp_path: Path) -> None:
    # Fresh scales in ModelOpt's layout would be a layout Recast made up for consumers no test runs: refused
    # before anything is written, naming the formats that take them; bf16 out is fine.
    with pytest.raises(RecastError, match=r"fresh per-tensor scales in the modelopt format.*--format fp8"):
        api.convert(modelopt, tmp_path / "fresh", api.Options(to="hf", quantize="per-tensor"))
    assert not (tmp_path / "fresh").exists()
    out = tmp_path / "ct"
    assert api.convert(
        modelopt, out, api.Options(to="hf", quantize="per-tensor", format="compressed-tensors")
    ).passed
    assert api.convert(modelopt, tmp_path / "bf16", api.Options(to="hf", quantize="none")).passed
