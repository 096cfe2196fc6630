"""Verification in flight: a wrong byte on its way to the writer fails the job before anything is
published, and the recorded SHA-256s are the hashes of the files as written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import flip_bits

from worker.engine import api, encode, to_native
from worker.engine.checkpoint import SIDECAR


def _flip_first(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    flat = t.reshape(-1).view(torch.uint8)
    flat[0] ^= 0x01
    return t


def _nothing_left(dst: Path) -> None:
    assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}.recast-*"))


def test_a_wrong_native_value_fails_before_publishing(checkpoint, tmp_path: Path, monkeypatch) -> None:
    src = checkpoint("mistral4", scheme="per-expert")
    real = to_native.forward

    def wrong(t, e0, e1, get):
        x = real(t, e0, e1, get)
        return _flip_first(x) if t.key.endswith("gate_and_up_projs") and x.is_floating_point() else x

    monkeypatch.setattr(to_native, "forward", wrong)
    with pytest.raises(api.VerificationError) as err:
        api.convert(src, tmp_path / "native", api.Options(to="native"))
    assert "mlp.experts.gate_up_proj" in str(err.value)
    _nothing_left(tmp_path / "native")


def test_a_wrong_fp8_byte_fails_the_way_back(checkpoint, tmp_path: Path, monkeypatch) -> None:
    src = checkpoint("deepseek-v3", scheme="block")
    api.convert(src, tmp_path / "native", api.Options(to="native"))
    real = encode.Encoder.rows

    def wrong(self, x, r0):
        pieces = real(self, x, r0)
        key, row, t = pieces[0]
        return [
            (key, row, _flip_first(t)) if key.endswith("down_proj.weight") else (key, row, t),
            *pieces[1:],
        ]

    monkeypatch.setattr(encode.Encoder, "rows", wrong)
    with pytest.raises(api.VerificationError) as err:
        api.convert(tmp_path / "native", tmp_path / "back", api.Options(to="hf"))
    assert "down_proj.weight" in str(err.value)
    _nothing_left(tmp_path / "back")


def test_recorded_hashes_are_the_written_files(checkpoint, tmp_path: Path) -> None:
    src = checkpoint("deepseek-v3", scheme="block")
    out = tmp_path / "native"
    api.convert(src, out, api.Options(to="native"))
    files = json.loads((out / SIDECAR).read_text())["files"]
    assert any(name.endswith(".safetensors") for name in files)
    for name, sha in files.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha, name


def test_recast_verify_catches_a_value_one_ulp_off(checkpoint, tmp_path: Path) -> None:
    """Re-quantizing alone would pass a bf16 value one ulp off (it rounds to the same FP8 code)."""
    src = checkpoint("mistral4", scheme="per-expert")
    native = tmp_path / "native"
    api.convert(src, native, api.Options(to="native"))
    flip_bits(native, "model.layers.1.mlp.experts.gate_and_up_projs", 0, 0x01)  # the first value's lowest bit
    with pytest.raises(api.VerificationError) as err:
        api.verify(src, native)
    assert "mlp.experts.gate_up_proj" in str(err.value)


def test_a_wrong_split_piece_fails_both_ways(checkpoint, tmp_path: Path, monkeypatch) -> None:
    # Ling's fused q | k | v (block FP8): each native piece is checked against its rows of the source in
    # flight, the fused tensor rebuilt from the pieces on the way back, and a piece changed on disk is
    # caught by recast verify; each failure names the fused hf tensor.
    src = checkpoint("ling-v2", scheme="block")
    real = to_native.forward

    def wrong(t, e0, e1, get):
        x = real(t, e0, e1, get)
        return _flip_first(x) if t.key.endswith("self_attn.k_proj.weight") else x

    with monkeypatch.context() as m:
        m.setattr(to_native, "forward", wrong)
        with pytest.raises(api.VerificationError) as err:
            api.convert(src, tmp_path / "bad", api.Options(to="native"))
    assert "attention.query_key_value.weight" in str(err.value)
    _nothing_left(tmp_path / "bad")

    native = tmp_path / "native"
    api.convert(src, native, api.Options(to="native"))
    real_rows = encode.Encoder.rows

    def wrong_rows(self, x, r0):
        (key, row, t), *rest = real_rows(self, x, r0)
        return [(key, row, _flip_first(t) if key.endswith("query_key_value.weight") else t), *rest]

    with monkeypatch.context() as m:
        m.setattr(encode.Encoder, "rows", wrong_rows)
        with pytest.raises(api.VerificationError) as err:
            api.convert(native, tmp_path / "back", api.Options(to="hf"))
    assert "attention.query_key_value.weight" in str(err.value)
    _nothing_left(tmp_path / "back")

    assert api.verify(src, native).passed
    flip_bits(native, "model.layers.1.self_attn.v_proj.weight", 7, 0x40)
    with pytest.raises(api.VerificationError) as err:
        api.verify(src, native)
    assert "model.layers.1.attention.query_key_value.weight" in str(err.value)
