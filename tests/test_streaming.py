"""Streaming in pieces gives the same bits as one piece: tiny step budgets force every tensor through
multi-piece reads (rows aligned to 128-row blocks, expert ranges, the per-tensor amax pre-pass)."""

from __future__ import annotations

from pathlib import Path

import pytest
import reference
from checkpoints import load_state_dict
from helpers import assert_state_dicts_identical, config

from worker.engine import api, options, verify
from worker.engine.checkpoint import open_checkpoint
from worker.engine.storage import open_source


@pytest.fixture
def tiny_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    for device in ("cpu", "cuda"):
        monkeypatch.setitem(options.STEP_BYTES, device, 4096)
    monkeypatch.setattr(verify, "STEP", 4096)


@pytest.mark.parametrize(
    "family,scheme", [("mistral4-vlm", "block"), ("deepseek-v3", "block"), ("mistral4", "per-expert")]
)
def test_pieces_round_trip_bit_for_bit(family, scheme, checkpoint, tiny_steps, tmp_path: Path) -> None:
    src = checkpoint(family, scheme=scheme)
    report = api.convert(src, tmp_path / "native", api.Options(to="native"))
    assert report.passed
    sd = load_state_dict(src)
    assert_state_dicts_identical(
        load_state_dict(tmp_path / "native"), reference.hf_to_native(sd, config(src), family)
    )
    assert api.convert(tmp_path / "native", tmp_path / "back", api.Options(to="hf")).passed
    assert_state_dicts_identical(load_state_dict(tmp_path / "back"), sd)


@pytest.mark.parametrize("mode", ["per-tensor", "block"])
def test_fresh_quantization_in_pieces(mode, plain_checkpoint, tiny_steps, tmp_path: Path) -> None:
    # not Mistral 4: fresh scales on its 3-D experts are refused (tests/test_consumers.py)
    src = plain_checkpoint("deepseek-v3")
    assert api.convert(src, tmp_path / "fp8", api.Options(to="hf", quantize=mode)).passed
    want = reference.quantize_state_dict(load_state_dict(src), mode)
    assert_state_dicts_identical(load_state_dict(tmp_path / "fp8"), want)


def _shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}


@pytest.mark.parametrize("family", ["qwen3-vl-moe", "step3p5"])
def test_aggregated_experts_stream_per_expert(family, checkpoint, tmp_path: Path, monkeypatch) -> None:
    """Aggregated 3-D experts (Qwen3-VL-MoE's, renamed only, with 3-D block scales; Step-3.5's, concatenated
    and transposed) are read and written an expert at a time under a small step budget: no unit reads a
    whole expert tensor, the shards are the bytes of the whole-tensor conversion, and the way back gives
    the source's shards. bench/moe_memory.py measures what this bounds, at 128-512 experts."""
    src = checkpoint(family, scheme="block")
    assert api.convert(src, tmp_path / "whole", api.Options(to="native")).passed
    for device in ("cpu", "cuda"):
        monkeypatch.setitem(options.STEP_BYTES, device, 4096)
    units: list[int] = []
    report = api.convert(
        src,
        tmp_path / "pieces",
        api.Options(to="native"),
        lambda p: units.append(p["bytes_in"]) if "bytes_in" in p else None,
    )
    assert report.passed
    tensors = open_checkpoint(open_source(src)).tensors
    experts = [v.nbytes for k, v in tensors.items() if len(v.shape) == 3 and not k.endswith("_scale_inv")]
    assert len(experts) >= 2 and max(units) < min(experts)
    assert _shards(tmp_path / "pieces") == _shards(tmp_path / "whole")
    assert api.convert(tmp_path / "pieces", tmp_path / "back", api.Options(to="hf")).passed
    assert _shards(tmp_path / "back") == _shards(src)
