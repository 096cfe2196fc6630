"""Bad input: one clear line naming the file or key, a non-zero exit, no traceback, nothing at DST."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import replace_tensor
from safetensors.torch import load_file, save_file

from worker.cli import main


@pytest.fixture
def src(checkpoint, tmp_path: Path) -> Path:
    copy = tmp_path / "src"
    shutil.copytree(checkpoint("mistral4", scheme="block"), copy)
    return copy


def _index(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def _shard_of(path: Path, key: str) -> Path:
    return path / _index(path)["weight_map"][key]


def truncate_shard(src: Path) -> str:
    shard = src / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    return "model-00002-of-00003.safetensors"


def drop_scale(src: Path) -> str:
    replace_tensor(src, "model.layers.1.self_attn.o_proj.weight_scale_inv", {})
    return "model.layers.1.self_attn.o_proj.weight"


def index_escapes(src: Path) -> str:
    index = _index(src)
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../../etc/passwd"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return "../../etc/passwd"


def absurd_header(src: Path) -> str:
    shard = src / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = (1 << 62).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    return "model-00001-of-00003.safetensors"


def bad_scale_shape(src: Path) -> str:
    key = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    shard = _shard_of(src, key)
    tensors = load_file(shard)
    tensors[key] = torch.ones(7, 3)
    save_file(tensors, shard, metadata={"format": "pt"})
    return "model.layers.0.self_attn.q_a_proj.weight"


def unsupported_arch(src: Path) -> str:
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    return "deepseek-v3"  # the message lists the supported adapters


CASES: dict[str, Callable[[Path], str]] = {
    "truncated shard": truncate_shard,
    "missing scale": drop_scale,
    "index outside the directory": index_escapes,
    "absurd header length": absurd_header,
    "scale shape does not fit": bad_scale_shape,
    "unsupported architecture": unsupported_arch,
}


@pytest.mark.parametrize("damage", CASES.values(), ids=CASES.keys())
def test_bad_input_is_named_and_leaves_nothing(damage, src: Path, tmp_path: Path, capsys) -> None:
    needle = damage(src)
    dst = tmp_path / "out" / "native"
    code = main(["convert", str(src), str(dst), "--to", "native"])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not dst.exists()
    assert (
        not any(p.name.startswith(".native") for p in dst.parent.iterdir()) if dst.parent.exists() else True
    )


def test_existing_target_is_refused_unless_overwrite(checkpoint, tmp_path: Path, capsys) -> None:
    src = checkpoint("mistral4", scheme="block")
    dst = tmp_path / "native"
    assert main(["convert", str(src), str(dst), "--to", "native"]) == 0
    before = sorted(p.name for p in dst.iterdir())
    capsys.readouterr()
    assert main(["convert", str(src), str(dst), "--to", "native"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in dst.iterdir()) == before
    assert main(["convert", str(src), str(dst), "--to", "native", "--overwrite", "--dtype", "fp32"]) == 0
    assert json.loads((dst / "recast.json").read_text())["options"]["dtype"] == "fp32"


def test_console_script_reports_without_traceback(src: Path, tmp_path: Path) -> None:
    truncate_shard(src)
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "convert", str(src), str(tmp_path / "dst"), "--to", "native"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "truncated" in proc.stderr and "Traceback" not in proc.stderr
