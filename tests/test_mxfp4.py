"""MXFP4 read (gpt-oss's experts): dequantized to native bf16 exactly as transformers dequantizes it, and
restored byte for byte on the way back; every step proven in flight, bad input named.

The checkpoint is transformers' own ``GptOssForCausalLM`` with a tiny config, its experts written the
way OpenAI's release stores them (tests/checkpoints.py ``mxfp4_state_dict``: ``*_blocks`` / ``*_scales``
by the OCP Microscaling definition). transformers' ``convert_moe_packed_tensors`` is the oracle for the
values here; tests/test_nemo_oracle.py compares the whole native checkpoint with NeMo AutoModel's gpt-oss
adapter, which dequantizes with a copy of that same function.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import E2M1, load_state_dict
from helpers import assert_state_dicts_identical, flip_bits, replace_tensor, same_bits
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from worker.cli import main
from worker.engine import api, mxfp4, to_native

BLOCKS = "model.layers.0.mlp.experts.gate_up_proj_blocks"
SCALES = "model.layers.0.mlp.experts.gate_up_proj_scales"
NATIVE = "model.layers.0.mlp.experts.gate_and_up_projs"


@pytest.fixture(scope="module")
def src(checkpoint) -> Path:
    return checkpoint("gpt-oss", scheme="mxfp4")


@pytest.fixture(scope="module")
def native(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpt-oss") / "native"
    report = api.convert(src, out, api.Options(to="native"))
    assert report.passed and report.adapter == "gpt-oss"
    return out


def _every_code_and_exponent(exponents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks holding every byte (so every pair of codes) under every exponent 0..exponents-1."""
    blocks = (
        torch.arange(256, dtype=torch.int32)
        .to(torch.uint8)
        .repeat(exponents, 1)
        .reshape(exponents, 1, 16, 16)
    )
    scales = (
        torch.arange(exponents, dtype=torch.int32).to(torch.uint8).reshape(exponents, 1, 1).expand(-1, 1, 16)
    )
    return blocks.transpose(0, 1).contiguous(), scales.transpose(0, 1).contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
def test_dequantize_is_transformers_bit_for_bit(dtype: torch.dtype) -> None:
    blocks, scales = _every_code_and_exponent(256)
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    got = mxfp4.dequantize(blocks, scales, dtype).transpose(1, 2)
    assert same_bits(got.contiguous(), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_recorded_scales_restore_every_code(dtype: torch.dtype) -> None:
    """Up to exponent 252 every code times its power of two is a distinct bf16 value, so the inverse with
    the recorded scales is exact; from 253 on the largest codes overflow to inf and cannot be told apart."""
    blocks, scales = _every_code_and_exponent(253)
    assert torch.equal(mxfp4.quantize(mxfp4.dequantize(blocks, scales, dtype), scales), blocks)
    high, high_scales = _every_code_and_exponent(255)
    back = mxfp4.quantize(mxfp4.dequantize(high, high_scales, torch.bfloat16), high_scales)
    assert not torch.equal(back[:, 253:], high[:, 253:])


def test_the_fixture_holds_every_code_and_the_extreme_exponents(src: Path) -> None:
    sd = load_state_dict(src)
    blocks = torch.cat([t.reshape(-1) for k, t in sd.items() if k.endswith("_blocks")])
    codes = torch.cat([blocks & 0x0F, blocks >> 4]).unique()
    assert codes.tolist() == list(range(2 * len(E2M1)))
    scales = torch.cat([t.reshape(-1) for k, t in sd.items() if k.endswith("_scales")])
    assert {1, 127, 252} <= set(scales.tolist())


def test_native_experts_are_transformers_dequantization(src: Path, native: Path) -> None:
    sd, got = load_state_dict(src), load_state_dict(native)
    experts = [k for k in sd if k.endswith("_blocks")]
    assert len(experts) == 4
    for key in experts:
        stem = key[: -len("_blocks")]
        want = convert_moe_packed_tensors(sd[key], sd[stem + "_scales"], dtype=torch.bfloat16)
        name = stem.replace("gate_up_proj", "gate_and_up_projs").replace("down_proj", "down_projs")
        assert same_bits(got[name], want), name
    assert not any(k.endswith(("_blocks", "_scales")) for k in got)
    config = json.loads((native / "config.json").read_text())
    assert "quantization_config" not in config


def test_native_is_what_transformers_loads(src: Path, native: Path) -> None:
    """transformers' own loader, which dequantizes MXFP4 on a machine without Triton, gives the same bits
    under the hf names (NeMo's renames undone)."""
    import transformers

    loaded = transformers.GptOssForCausalLM.from_pretrained(src, dtype=torch.bfloat16).state_dict()
    got = load_state_dict(native)
    experts = {"experts.gate_up_proj": "experts.gate_and_up_projs", "experts.down_proj": "experts.down_projs"}
    for key, want in loaded.items():
        name = key.replace(".mlp.router.", ".mlp.gate.")
        for hf, nemo in experts.items():
            if name.endswith(hf):
                name = name[: -len(hf)] + nemo
        assert same_bits(got[name], want), key
    assert len(loaded) == len(got)


def test_the_way_back_restores_the_mxfp4_bytes(src: Path, native: Path, tmp_path: Path) -> None:
    back = tmp_path / "back"
    assert main(["convert", str(native), str(back), "--to", "hf"]) == 0
    for f in src.iterdir():
        assert (back / f.name).read_bytes() == f.read_bytes(), f.name
    api.verify(src, native)
    api.verify(native, back)


def test_hf_keep_rewrites_the_same_mxfp4(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert api.convert(src, out, api.Options(to="hf", quantize="keep")).passed
    assert_state_dicts_identical(load_state_dict(out), load_state_dict(src))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"


def test_a_wrong_native_value_fails_in_flight(src: Path, tmp_path: Path, monkeypatch) -> None:
    real = to_native.forward

    def wrong(t, e0, e1, get):
        x = real(t, e0, e1, get)
        if t.key == NATIVE:
            x = x.clone()
            x.reshape(-1).view(torch.int16)[1] ^= 1
        return x

    monkeypatch.setattr(to_native, "forward", wrong)
    with pytest.raises(api.VerificationError) as err:
        api.convert(src, tmp_path / "native", api.Options(to="native"))
    assert BLOCKS in str(err.value)
    assert not (tmp_path / "native").exists()


def _changed_native(native: Path, tmp_path: Path) -> Path:
    """The native checkpoint with one expert value moved off MXFP4's grid (its lowest mantissa bit)."""
    changed = tmp_path / "changed"
    shutil.copytree(native, changed)
    values = load_state_dict(native)[NATIVE].reshape(-1)
    first = int(torch.nonzero(values.float().abs() > 0)[0])
    flip_bits(changed, NATIVE, 2 * first, 0x01)
    return changed


def test_a_value_off_the_mxfp4_grid_is_not_written_back(native: Path, src: Path, tmp_path: Path) -> None:
    changed = _changed_native(native, tmp_path)
    with pytest.raises(api.VerificationError) as err:
        api.convert(changed, tmp_path / "back", api.Options(to="hf"))
    assert BLOCKS in str(err.value) and "mxfp4" in str(err.value)
    assert not (tmp_path / "back").exists()
    with pytest.raises(api.VerificationError) as err:
        api.verify(src, changed)
    assert BLOCKS in str(err.value)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--quantize", "none"], "--quantize keep"),
        (["--quantize", "block", "--format", "fp8"], "--quantize keep"),
        (["--format", "fp8"], "leave --format unset"),
    ],
    ids=["none", "block", "format-fp8"],
)
def test_mxfp4_is_written_only_as_kept(native: Path, tmp_path: Path, capsys, options, says) -> None:
    dst = tmp_path / "out"
    assert main(["convert", str(native), str(dst), "--to", "hf", *options]) == 2
    err = capsys.readouterr().err
    assert "_blocks" in err and says in err
    assert not dst.exists()


def _scales_of_wrong_shape(src: Path) -> str:
    scales = load_state_dict(src)[SCALES]
    replace_tensor(src, SCALES, {SCALES: torch.cat([scales, scales[..., :1]], -1)})
    return f"MXFP4 scales of {BLOCKS!r} have shape [4, 192, 3]"


def _blocks_of_wrong_size(src: Path) -> str:
    blocks = load_state_dict(src)[BLOCKS]
    replace_tensor(src, BLOCKS, {BLOCKS: blocks.reshape(4, 192, 4, 8)})
    return f"MXFP4 blocks {BLOCKS!r} have shape [4, 192, 4, 8]"


def _scales_with_nan(src: Path) -> str:
    scales = load_state_dict(src)[SCALES].clone()
    scales[2, 5, 1] = 0xFF  # e8m0's NaN
    replace_tensor(src, SCALES, {SCALES: scales})
    return f"{SCALES!r} of {BLOCKS!r} holds the e8m0 code 0xFF (NaN, not a power of two) at [2, 5, 1]"


def _blocks_without_scales(src: Path) -> str:
    replace_tensor(src, SCALES, {})
    return f"{BLOCKS!r}"


@pytest.mark.parametrize(
    "damage", [_scales_of_wrong_shape, _blocks_of_wrong_size, _scales_with_nan, _blocks_without_scales]
)
def test_bad_mxfp4_is_named_and_leaves_nothing(damage, src: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    says = damage(copy)
    dst = tmp_path / "native"
    assert main(["convert", str(copy), str(dst), "--to", "native"]) == 2
    err = capsys.readouterr().err
    assert says in err, err
    assert not dst.exists()


def test_inspect_names_the_format(src: Path, native: Path) -> None:
    found = api.inspect(src)
    assert found["adapter"] == "gpt-oss"
    assert found["quantization"]["format"] == "mxfp4"
    assert found["quantization"]["schemes"] == ["mxfp4"]
    formats = found["quantization"]["output_formats"]
    assert formats["mxfp4"] == {"keep": True, "quantize": []}
    assert not formats["fp8"]["keep"] and not formats["compressed-tensors"]["keep"]
    written = sum(t.numel() * t.element_size() for t in load_state_dict(native).values())
    assert found["conversion"]["output_bytes"] == written
    assert api.inspect(native)["quantization"]["output_formats"]["mxfp4"]["keep"]
