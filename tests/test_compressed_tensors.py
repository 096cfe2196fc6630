"""compressed-tensors FP8 in and out (issue 11): the same numbers as the vendor layout under other names.

A checkpoint in compressed-tensors form converts to native with exactly the bits its vendor-layout twin
gives, and comes back byte for byte; ``--format`` writes either layout from any source, for every scheme.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from checkpoints import load_state_dict

from worker.engine import api
from worker.engine.errors import RecastError

CASES = [
    ("deepseek-v3", "per-tensor"),  # static input_scale, [1] scales
    ("deepseek-v3", "block"),
    ("mistral4", "per-tensor"),  # 3-D expert tensors: gate_up_proj_scale, gate_up_proj_input_scale
    ("mistral4", "block"),
    ("mistral3-fp8", "per-tensor"),  # a VLM: quantization_config in text_config too
]


def _bytes(path: Path, names: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
        if (p.suffix == ".safetensors" and p.name.startswith("model")) or p.name in names
    }


def _convert(src: Path, dst: Path, **options) -> api.Report:
    report = api.convert(src, dst, api.Options(**options))
    assert report.passed, report.summary()
    return report


@pytest.mark.parametrize(("family", "scheme"), CASES)
def test_native_bits_equal_the_vendor_layout_and_the_way_back_is_byte_for_byte(
    family, scheme, checkpoint, ct_checkpoint, tmp_path: Path
) -> None:
    ct, vendor = ct_checkpoint(family, scheme), checkpoint(family, scheme=scheme)
    _convert(ct, tmp_path / "ct-native", to="native")
    _convert(vendor, tmp_path / "vendor-native", to="native")
    index = ("model.safetensors.index.json",)
    assert _bytes(tmp_path / "ct-native", index) == _bytes(tmp_path / "vendor-native", index)
    _convert(tmp_path / "ct-native", tmp_path / "back", to="hf")
    files = ("config.json", *index)
    assert _bytes(tmp_path / "back", files) == _bytes(ct, files)


@pytest.mark.parametrize("family", ["deepseek-v3", "mistral4"])
def test_per_channel_with_zero_points_round_trips(family, ct_checkpoint, tmp_path: Path) -> None:
    src = ct_checkpoint(family, "per-channel", zero_points=True)
    report = _convert(src, tmp_path / "native", to="native")
    assert any(k.endswith("weight_zero_point") for k in report.accounting["scales"])
    _convert(tmp_path / "native", tmp_path / "back", to="hf")
    files = ("config.json", "model.safetensors.index.json")
    assert _bytes(tmp_path / "back", files) == _bytes(src, files)


# Not Mistral 4's 3-D experts nor DeepSeek's block-scaled experts in compressed-tensors: refused, as
# transformers would misread them (tests/test_consumers.py).
@pytest.mark.parametrize(("family", "scheme"), [("deepseek-v3", "per-tensor"), ("llama", "block")])
def test_keep_across_formats_keeps_the_fp8_bytes(family, scheme, checkpoint, tmp_path: Path) -> None:
    """Vendor → native → compressed-tensors (recorded scales) → native gives the same native bits, and
    the compressed-tensors output holds the vendor's FP8 codes under compressed-tensors names."""
    vendor = checkpoint(family, scheme=scheme)
    _convert(vendor, tmp_path / "native", to="native")
    _convert(tmp_path / "native", tmp_path / "ct", to="hf", format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    got, want = load_state_dict(tmp_path / "ct"), load_state_dict(vendor)
    for key, t in want.items():
        if key.endswith("_scale_inv"):
            assert got[key[: -len("_inv")]].reshape(-1).equal(t.reshape(-1)), key
        elif t.dtype.itemsize == 1:
            assert got[key].view(-1).view(t.dtype).equal(t.view(-1)) or got[key].equal(t), key
    assert not any(k.endswith(("_scale_inv", "activation_scale")) for k in got)
    _convert(tmp_path / "ct", tmp_path / "native2", to="native")
    # Recast lays out the shards it plans its own way, so compare tensors rather than files.
    again, native = load_state_dict(tmp_path / "native2"), load_state_dict(tmp_path / "native")
    assert again.keys() == native.keys()
    assert all(
        again[k].view(-1).view(torch.uint8).equal(t.view(-1).view(torch.uint8)) for k, t in native.items()
    )


@pytest.mark.parametrize("scheme", ["per-tensor", "per-channel", "block"])
def test_fresh_quantization_in_compressed_tensors(scheme, plain_checkpoint, tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    # compressed-tensors block scales on DeepSeek's expert weights are refused (tests/test_consumers.py)
    src = plain_checkpoint("llama" if scheme == "block" else "deepseek-v3")
    _convert(src, tmp_path / "q", to="hf", quantize=scheme, format="compressed-tensors")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    strategy = {"per-tensor": "tensor", "per-channel": "channel", "block": "block"}[scheme]
    assert [g.weights.strategy for g in parsed.config_groups.values()] == [strategy]
    sd = load_state_dict(tmp_path / "q")
    assert "model.layers.0.mlp.gate_proj.weight_scale" in sd
    if scheme == "per-channel":
        assert sd["model.layers.0.mlp.gate_proj.weight_scale"].shape == (200, 1)
    if scheme == "per-tensor":
        assert sd["model.layers.0.mlp.gate_proj.weight_scale"].shape == (1,)
    _convert(tmp_path / "q", tmp_path / "native", to="native")


def test_per_channel_in_the_vendor_layout_is_refused(plain_checkpoint, tmp_path: Path) -> None:
    with pytest.raises(RecastError, match="--format compressed-tensors"):
        api.convert(
            plain_checkpoint("deepseek-v3"), tmp_path / "q", api.Options(to="hf", quantize="per-channel")
        )
    assert not (tmp_path / "q").exists()


def test_inspect_names_the_format_and_schemes(ct_checkpoint, checkpoint) -> None:
    ct = api.inspect(ct_checkpoint("deepseek-v3", "block"))["quantization"]
    assert ct["format"] == "compressed-tensors"
    assert ct["groups"][0]["weights"] == "block" and ct["groups"][0]["input_activations"] == "dynamic"
    assert "block" in ct["schemes"]  # a weight within one 128x128 block reads as per-tensor
    assert set(ct["output_formats"]) == {"fp8", "compressed-tensors"}
    vendor = api.inspect(checkpoint("mistral4", scheme="per-expert"))["quantization"]
    assert vendor["format"] == "fp8"
    # Mistral 4's 3-D expert tensors: only its own layout, kept, is written (tests/test_consumers.py)
    assert vendor["output_formats"] == {
        "fp8": {"keep": True, "quantize": []},
        "compressed-tensors": {"keep": False, "quantize": []},
    }
    deepseek = api.inspect(checkpoint("deepseek-v3", scheme="block"))["quantization"]
    assert deepseek["output_formats"] == {
        "fp8": {"keep": True, "quantize": ["per-tensor", "block"]},
        "compressed-tensors": {"keep": False, "quantize": ["per-tensor", "per-channel"]},
    }
