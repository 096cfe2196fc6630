"""Kimi K3: its MXFP4 experts in compressed-tensors' mxfp4-pack-quantized spelling and its padded KDA A_log.

tests/test_nemo_oracle.py holds the whole native checkpoint against NeMo's KimiK3StateDictAdapter (both
ways); here compressed-tensors itself is the oracle of the format: its own MXFP4 decompressor, on the
scheme the checkpoint's config declares, gives the values Recast writes, and its schema reads that config.
The fixture is transformers' Kimi Linear re-spelled as a K3 release (tests/checkpoints.py ``_as_kimi_k3``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import flat_mxfp4, load_state_dict
from helpers import assert_state_dicts_identical, config, flip_bits, replace_tensor

from worker.cli import main
from worker.engine import api
from worker.engine.checkpoint import SIDECAR
from worker.engine.errors import CheckpointError, RecastError, UnsupportedModelError, VerificationError
from worker.engine.header_schema import RecordedTensor

EXPERT = "language_model.model.layers.{layer}.block_sparse_moe.experts.{e}.{part}.weight"
A_LOG = "language_model.model.layers.0.self_attn.A_log"


@pytest.fixture(scope="module")
def src(checkpoint) -> Path:
    return checkpoint("kimi-k3", scheme="mxfp4-ct")


@pytest.fixture(scope="module")
def native(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kimi-k3") / "native"
    report = api.convert(src, out, api.Options(to="native"))
    assert report.passed and report.adapter == "kimi-k3"
    return out


def _ct_dequantized(src: Path) -> dict[str, torch.Tensor]:
    """Every packed expert weight as compressed-tensors' MXFP4 compressor decompresses it, with the scheme
    of the config group config.json gives it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(config(src)["quantization_config"])
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    scheme = qc.config_groups["group_0"]
    sd = load_state_dict(src)
    out = {}
    for key in (k for k in sd if k.endswith(".weight_packed")):
        base = key.removesuffix("_packed")
        local = {"weight_packed": sd[key], "weight_scale": sd[base + "_scale"]}
        out[base] = compressor.decompress(local, scheme)["weight"].to(torch.bfloat16)
    return out


def test_native_experts_are_compressed_tensors_decompression(src: Path, native: Path) -> None:
    weights, got = _ct_dequantized(src), load_state_dict(native)
    assert len(weights) == 2 * 4 * 3
    for layer in (1, 2):

        def w(e: int, part: str, layer: int = layer) -> torch.Tensor:
            return weights[EXPERT.format(layer=layer, e=e, part=part)]

        want = {
            "gate_and_up_projs": torch.stack([torch.cat([w(e, "w1").T, w(e, "w3").T], -1) for e in range(4)]),
            "down_projs": torch.stack([w(e, "w2").T for e in range(4)]),
        }
        prefix = f"model.layers.{layer}.mlp.experts."
        assert_state_dicts_identical({k: got[prefix + k] for k in want}, want)
    # the fixture's extreme exponents are in there, and signed zeros survive for the way back
    scale = load_state_dict(src)[EXPERT.format(layer=1, e=1, part="w1") + "_scale"]
    assert int(scale[0, 0]) == 1 and int(scale[1, 1]) == 252


def test_the_config_is_compressed_tensors_own_and_kept_verbatim(
    src: Path, native: Path, tmp_path: Path
) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(config(src)["quantization_config"])
    assert qc.format == "mxfp4-pack-quantized" and qc.config_groups["group_0"].weights.group_size == 32
    found = api.inspect(src)
    assert found["adapter"] == "kimi-k3"
    assert found["quantization"]["format"] == "compressed-tensors-mxfp4"
    assert found["quantization"]["schemes"] == ["fp4-u8"]
    assert found["quantization"]["output_formats"]["compressed-tensors-mxfp4"] == {
        "keep": True,
        "quantize": [],
    }
    back = tmp_path / "back"
    assert api.convert(native, back, api.Options(to="hf")).passed
    assert config(back)["quantization_config"] == config(src)["quantization_config"]
    for shard in sorted(src.glob("*.safetensors")):
        assert (back / shard.name).read_bytes() == shard.read_bytes()


def test_an_unpadded_a_log_is_read_and_restored(src: Path, tmp_path: Path) -> None:
    # NeMo's from_hf takes any A_log at least num_heads long; one stored without padding round-trips as
    # stored (its recorded length), while a native checkpoint without recast.json goes back padded, as
    # NeMo's to_hf writes it.
    copy, a_log = _rewritten(src, tmp_path, A_LOG, lambda t: t[:4])
    native = tmp_path / "native"
    assert api.convert(copy, native, api.Options(to="native")).passed
    assert torch.equal(load_state_dict(native)["model.layers.0.self_attn._fp32_params.A_log"], a_log)
    assert api.convert(native, tmp_path / "back", api.Options(to="hf")).passed
    assert_state_dicts_identical(load_state_dict(tmp_path / "back"), load_state_dict(copy))
    (native / SIDECAR).unlink()
    assert api.convert(native, tmp_path / "nemo", api.Options(to="hf", quantize="none")).passed
    padded = load_state_dict(tmp_path / "nemo")[A_LOG]
    assert padded.shape == (128,) and torch.equal(padded[:4], a_log) and not padded[4:].any()


def test_an_a_log_shorter_than_the_heads_is_refused(src: Path, tmp_path: Path, capsys) -> None:
    copy, _ = _rewritten(src, tmp_path, A_LOG, lambda t: t[:3])
    dst = tmp_path / "native"
    assert main(["convert", str(copy), str(dst), "--to", "native"]) == 2
    err = capsys.readouterr().err
    assert f"{A_LOG!r} has shape [3]; its layout holds 4 entries" in err, err
    assert not dst.exists()


def test_a_log_padding_is_dropped_and_restored(src: Path, native: Path) -> None:
    stored, held = load_state_dict(src)[A_LOG], load_state_dict(native)
    assert stored.shape == (128,) and not stored[4:].any()
    a_log = held["model.layers.0.self_attn._fp32_params.A_log"]
    assert a_log.dtype == torch.float32 and torch.equal(a_log, stored[:4])
    plan = json.loads((native / SIDECAR).read_text())["plan"]["tensors"]
    entry = next(t for t in plan if t["key"] == "model.layers.0.self_attn._fp32_params.A_log")
    assert entry == {
        "key": entry["key"],
        "kind": "unpad",
        "parts": [A_LOG],
        "experts": 0,
        "names": 1,
        "rows": [4, 128],
    }


def _rewritten(src: Path, tmp_path: Path, key: str, change) -> tuple[Path, torch.Tensor]:
    """A copy of ``src`` with tensor ``key`` replaced by ``change(key's tensor)``, and that tensor."""
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    tensor = change(load_state_dict(copy)[key].clone())
    replace_tensor(copy, key, {key: tensor})
    return copy, tensor


def _set(index: tuple[int, ...], value: float):
    def change(t: torch.Tensor) -> torch.Tensor:
        t[index] = value
        return t

    return change


@pytest.mark.parametrize(
    "key, index, value, says",
    [
        (
            A_LOG,
            (100,),
            0.5,
            f"{A_LOG!r} holds 128 entries of which its layout uses 4; the other 124 must be zero",
        ),
        (A_LOG, (5,), -0.0, f"{A_LOG!r} holds 128 entries of which its layout uses 4"),  # back as +0.0
        (
            EXPERT.format(layer=2, e=3, part="w3") + "_scale",
            (7, 2),
            0xFF,
            "holds the e8m0 code 0xFF (NaN, not a power of two) at [7, 2]",
        ),
    ],
)
def test_damage_is_named_and_nothing_written(
    key, index, value, says, src: Path, tmp_path: Path, capsys
) -> None:
    copy, _ = _rewritten(src, tmp_path, key, _set(index, value))
    dst = tmp_path / "native"
    assert main(["convert", str(copy), str(dst), "--to", "native"]) == 2
    err = capsys.readouterr().err
    assert says in err, err
    assert not dst.exists()


@pytest.mark.parametrize(
    "rows, ok",
    [([4, 128], True), ([128, 128], True), ([0, 128], False), ([5, 4], False), ([0, 4, 8, 128], False)],
)
def test_recast_json_unpad_rows_are_checked(rows: list[int], ok: bool) -> None:
    entry = {"key": "k", "kind": "unpad", "parts": ["h"], "rows": rows}
    if ok:
        assert RecordedTensor.model_validate(entry).rows == rows
    else:
        with pytest.raises(ValueError, match="unpadded tensor"):
            RecordedTensor.model_validate(entry)


@pytest.mark.parametrize("quantize, fmt", [("none", None), ("block", "fp8"), ("keep", None)])
def test_hf_to_hf_in_place_names_the_weights(
    quantize: str, fmt: str | None, src: Path, native: Path, tmp_path: Path
) -> None:
    # Re-encoded in place other than kept, the packed experts go out under their weights' names, exactly what
    # the way through the native layout writes; kept, the source comes back byte for byte.
    out = tmp_path / "hf"
    report = api.convert(src, out, api.Options(to="hf", quantize=quantize, format=fmt))
    assert report.passed and not report.accounting["unaccounted"]
    assert api.verify(src, out).passed
    if quantize == "keep":
        assert_state_dicts_identical(load_state_dict(out), load_state_dict(src))
        return
    via = tmp_path / "via-native"
    assert api.convert(native, via, api.Options(to="hf", quantize=quantize, format=fmt)).passed
    assert_state_dicts_identical(load_state_dict(out), load_state_dict(via))
    assert config(out) == config(via)
    # the renamed tensors are held against the source's codes: a flipped sign is caught
    flip_bits(out, EXPERT.format(layer=2, e=3, part="w2"), 1, 0x80)
    with pytest.raises(VerificationError, match=r"experts\.3\.w2\.weight_packed"):
        api.verify(src, out)


@pytest.mark.parametrize(
    "quantize, fmt, dtype",
    [("none", None, torch.bfloat16), ("block", "fp8", torch.float8_e4m3fn)],
)
def test_the_way_back_without_the_codes_names_the_weights(
    quantize: str, fmt: str | None, dtype: torch.dtype, src: Path, native: Path, tmp_path: Path
) -> None:
    # Not kept, the experts go back under their weights' own names (bf16, or FP8 with fresh scales), which
    # Recast (and NeMo's from_hf) read as an unquantized K3 release; verification follows the renaming.
    out = tmp_path / "hf"
    assert api.convert(native, out, api.Options(to="hf", quantize=quantize, format=fmt)).passed
    sd = load_state_dict(out)
    assert not [k for k in sd if re.search(r"weight_(packed|scale)$", k)]
    assert sd[EXPERT.format(layer=1, e=0, part="w2")].dtype == dtype
    assert (
        "quantization_config" not in config(out)
        or config(out)["quantization_config"]["quant_method"] == "fp8"
    )
    assert api.verify(native, out).passed
    again = tmp_path / "again"
    assert api.convert(out, again, api.Options(to="native")).passed
    if quantize == "none":
        assert_state_dicts_identical(load_state_dict(again), load_state_dict(native))


def test_kimi_linear_forced_on_k3_is_refused_naming_kimi_k3(src: Path, tmp_path: Path) -> None:
    # The two share the text model_type and the expert layout; Kimi Linear's rules do not map K3's latent MoE.
    dst = tmp_path / "native"
    with pytest.raises(UnsupportedModelError, match=r"routed_expert_hidden_size=96.*adapter kimi-k3"):
        api.convert(src, dst, api.Options(to="native", adapter="kimi-linear"))
    assert not dst.exists()


def test_packed_codes_outside_the_experts_are_named_as_their_weight(src: Path, tmp_path: Path) -> None:
    # compressed-tensors may pack any Linear: a packed shared expert is held as its weight, bf16, under the
    # weight's native name, its values compressed-tensors' own decompression; back byte for byte.
    shared = "language_model.model.layers.1.block_sparse_moe.shared_experts.down_proj.weight"
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    codes, scales = flat_mxfp4(load_state_dict(copy)[shared])
    replace_tensor(copy, shared, {shared + "_packed": codes, shared + "_scale": scales})
    native = tmp_path / "native"
    assert api.convert(copy, native, api.Options(to="native")).passed
    got = load_state_dict(native)["model.layers.1.mlp.shared_experts.down_proj.weight"]
    assert torch.equal(got, _ct_dequantized(copy)[shared])
    assert api.convert(native, tmp_path / "back", api.Options(to="hf")).passed
    assert_state_dicts_identical(load_state_dict(tmp_path / "back"), load_state_dict(copy))


def test_a_compressed_tensors_format_recast_does_not_read_is_named(src: Path, tmp_path: Path) -> None:
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    cfg = config(copy)
    cfg["quantization_config"]["format"] = "pack-quantized"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="compressed-tensors format 'pack-quantized' is not supported"):
        api.convert(copy, tmp_path / "native", api.Options(to="native"))
    assert not (tmp_path / "native").exists()


def test_keeping_the_codes_in_another_format_says_to_leave_it_unset(native: Path, tmp_path: Path) -> None:
    with pytest.raises(RecastError, match="written only in its own format: leave --format unset"):
        api.convert(
            native, tmp_path / "hf", api.Options(to="hf", quantize="keep", format="compressed-tensors")
        )
