"""The CUDA path writes the same bits as the CPU path (skipped without CUDA)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from worker.engine import api

pytestmark = pytest.mark.gpu


def _shards(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


@pytest.mark.parametrize(
    "family,scheme",
    [("mistral4-vlm", "per-expert"), ("deepseek-v3", "block"), ("mistral3-fp8", "per-tensor")],
)
def test_cuda_writes_the_cpu_bits(family, scheme, checkpoint, tmp_path: Path) -> None:
    src = checkpoint(family, scheme=scheme)
    for device in ("cpu", "cuda"):
        started = time.perf_counter()
        report = api.convert(src, tmp_path / device, api.Options(to="native", device=device))
        assert report.passed
        print(f"{family} {scheme} {device}: {time.perf_counter() - started:.2f}s")
    assert _shards(tmp_path / "cpu") == _shards(tmp_path / "cuda")
    for device in ("cpu", "cuda"):
        api.convert(
            tmp_path / device,
            tmp_path / f"fp8-{device}",
            api.Options(to="hf", quantize="block", device=device),
        )
    assert _shards(tmp_path / "fp8-cpu") == _shards(tmp_path / "fp8-cuda")
