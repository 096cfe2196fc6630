"""An adapter must account for the checkpoint or be refused (issue 18).

Verification compares the output with the plan the chosen adapter made, so a wrong ``--adapter`` used to
pass it while leaving the experts unconverted. Planning now refuses such an adapter before anything is
written, and still allows one that writes exactly what the detected adapter writes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from worker.cli import main
from worker.engine import api
from worker.engine.adapters import detect
from worker.engine.checkpoint import MANIFEST, SIDECAR
from worker.engine.errors import AdapterMismatchError


def _refused(src: Path, dst: Path, to: str, adapter: str) -> AdapterMismatchError:
    with pytest.raises(AdapterMismatchError) as info:
        api.convert(src, dst, api.Options(to=to, adapter=adapter))
    assert info.value.code == "adapter_mismatch"
    assert not dst.exists() and not list(dst.parent.glob(f".{dst.name}*"))
    return info.value


def _files(path: Path) -> dict[str, str]:
    """SHA-256 of every file written, except the two that record how the conversion was run."""
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name not in (SIDECAR, MANIFEST)
    }


def test_mistral4_adapter_on_deepseek_is_refused(checkpoint, tmp_path: Path) -> None:
    err = _refused(checkpoint("deepseek-v3", scheme="block"), tmp_path / "native", "native", "mistral4")
    assert "deepseek-v3" in str(err) and "model.layers.1.mlp.experts.0.down_proj.weight" in str(err)


def test_deepseek_adapter_on_mistral4_is_refused(checkpoint, tmp_path: Path) -> None:
    err = _refused(checkpoint("mistral4", scheme="block"), tmp_path / "native", "native", "deepseek-v3")
    assert "looks like mistral4" in str(err) and "model.layers.1.mlp.experts.gate_up_proj" in str(err)


def test_deepseek_v3_adapter_on_deepseek_v4_is_refused(checkpoint, tmp_path: Path) -> None:
    # V4's routed experts (ffn.experts.{e}.w1) are no rule of V3's: forced, they would pass through unstacked.
    err = _refused(checkpoint("deepseek-v4", scheme="fp8-v4"), tmp_path / "native", "native", "deepseek-v3")
    assert "deepseek-v4" in str(err) and "layers.0.ffn.experts.0.w1.weight" in str(err)


def test_dense_adapter_on_moe_checkpoint_is_refused(checkpoint, tmp_path: Path) -> None:
    err = _refused(checkpoint("mistral4-vlm", scheme="block"), tmp_path / "native", "native", "mistral3-fp8")
    assert "mistral4-vlm" in str(err) and "gate_up_proj" in str(err)


@pytest.mark.parametrize(
    "family,layout,adapter",
    [("mistral4", "default", "mistral4-vlm"), ("mistral3-fp8", "causal", "deepseek-v3")],
)
def test_adapter_writing_the_same_bytes_is_allowed(
    family, layout, adapter, checkpoint, tmp_path: Path
) -> None:
    src = checkpoint(family, layout=layout)
    api.convert(src, tmp_path / "detected", api.Options(to="native"))
    report = api.convert(src, tmp_path / "forced", api.Options(to="native", adapter=adapter))
    assert report.passed and report.adapter == adapter
    assert _files(tmp_path / "forced") == _files(tmp_path / "detected")


def test_adapter_writing_other_bytes_is_refused_even_where_its_family_is_named(checkpoint, tmp_path) -> None:
    # mistral4-vlm lists Mistral 4 as its text model, but on the prefixed spelling it would rename every
    # key to the VLM layout: not what the Mistral 4 text adapter writes.
    err = _refused(checkpoint("mistral4", layout="prefixed"), tmp_path / "native", "native", "mistral4-vlm")
    assert "mistral4-vlm would write different tensors" in str(err)


@pytest.fixture
def native(checkpoint, tmp_path: Path) -> Path:
    out = tmp_path / "native"
    api.convert(checkpoint("mistral4", scheme="per-expert"), out, api.Options(to="native"))
    return out


def test_recorded_adapter_wins_over_a_conflicting_override(native: Path, tmp_path: Path) -> None:
    # recast.json records the plan and the adapter; an override that would quantize differently conflicts.
    err = _refused(native, tmp_path / "hf", "hf", "deepseek-v3")
    assert "written with adapter 'mistral4'" in str(err)
    api.convert(native, tmp_path / "unset", api.Options(to="hf"))
    api.convert(native, tmp_path / "same", api.Options(to="hf", adapter="mistral4-vlm"))
    assert _files(tmp_path / "same") == _files(tmp_path / "unset")


@pytest.mark.parametrize(
    "adapter,needle", [("mistral3-fp8", "gate_and_up_projs"), ("deepseek-v3", "Mistral4")]
)
def test_native_without_recast_json_is_checked_too(adapter, needle, native: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(native, bare)
    (bare / SIDECAR).unlink()
    err = _refused(bare, tmp_path / "hf", "hf", adapter)
    assert needle in str(err) and "mistral4" in str(err)


def test_cli_mismatch_is_one_line_and_exit_2(checkpoint, tmp_path: Path, capsys) -> None:
    src, dst = checkpoint("deepseek-v3", scheme="block"), tmp_path / "out" / "native"
    code = main(["convert", str(src), str(dst), "--to", "native", "--adapter", "mistral4"])
    err = capsys.readouterr().err
    assert code == 2 and "deepseek-v3" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not dst.exists()


def test_report_lists_the_keys_that_passed_through(checkpoint, tmp_path: Path) -> None:
    report = api.convert(checkpoint("mistral4"), tmp_path / "native", api.Options(to="native"))
    passthrough = report.to_json()["accounting"]["passthrough"]
    assert "model.layers.0.input_layernorm.weight" in passthrough and "model.norm.weight" in passthrough
    assert not [k for k in passthrough if ".experts." in k or k.endswith("e_score_correction_bias")]
    assert report.summary()["accounting"]["passthrough"] == len(passthrough)
    sidecar = json.loads((tmp_path / "native" / SIDECAR).read_text())
    assert sidecar["verification"]["accounting"]["passthrough"] == len(passthrough)
    # A renaming adapter passes nothing through under its own name.
    vlm = api.convert(checkpoint("mistral4-vlm"), tmp_path / "vlm", api.Options(to="native"))
    assert vlm.accounting["passthrough"] == []


_MOE = ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
_DENSE = ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.input_layernorm.weight"]
_VLM = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3"}


@pytest.mark.parametrize(
    "config,keys,expected",
    [
        (_VLM, _DENSE, "mistral3-fp8"),
        (_VLM, [f"language_model.{k}" for k in _DENSE + _MOE], "mistral4-vlm"),
        ({**_VLM, "text_config": {"model_type": "mistral4"}}, _DENSE, "mistral4-vlm"),
        ({**_VLM, "text_config": {"model_type": "ministral3"}}, _DENSE, "mistral3-fp8"),
        ({"architectures": ["MistralModel"], "model_type": "mistral"}, _DENSE, "mistral3-fp8"),
        ({"architectures": ["Mistral4ForCausalLM"]}, _DENSE + _MOE, "mistral4"),
        ({"architectures": ["DeepseekV3ForCausalLM"]}, [*_DENSE, "model.layers.1.mlp.experts.0.up_proj.weight"],
         "deepseek-v3"),
    ],
)  # fmt: skip
def test_detection_reads_the_adapters_data(config, keys, expected) -> None:
    assert detect(config, keys).name == expected
