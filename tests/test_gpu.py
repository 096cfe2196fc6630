"""The CUDA path writes the same bits as the CPU path (skipped without CUDA)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from worker.engine import api

pytestmark = pytest.mark.gpu


def _shards(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


# Back with their own scales: 3-D experts that transformers would not load with fresh ones (Mistral 4's
# gate_up_proj, Inkling's w13_weight: tests/test_consumers.py), and MXFP8, MXFP4 and DeepSeek-V4's FP4 and
# e8m0 block scales (V4.1's of 32x32), whose exponents only a restore writes, MiMo-V2.5-Pro's
# per-shard block grids, and Kimi K3's compressed-tensors MXFP4 (whose format takes no fresh scales).
_KEPT = (
    "mistral4-vlm", "minimax-m3", "inkling", "deepseek-v4", "deepseek-v4.1", "gpt-oss", "mimo-v2.5-pro", "kimi-k3",
)  # fmt: skip


@pytest.mark.parametrize(
    "family,scheme",
    [
        ("mistral4-vlm", "per-expert"),
        ("deepseek-v3", "block"),
        ("mistral3-fp8", "per-tensor"),
        ("minimax-m3", "mxfp8"),
        ("inkling", "block"),
        ("nemotron-v3", "block"),
        ("deepseek-v4", "fp8-v4"),
        ("deepseek-v4.1", "fp8-v41"),
        ("gpt-oss", "mxfp4"),
        ("mimo-v2.5-pro", "block"),
        ("kimi-k3", "mxfp4-ct"),
    ],
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
            api.Options(to="hf", quantize="keep" if family in _KEPT else "block", device=device),
        )
    assert _shards(tmp_path / "fp8-cpu") == _shards(tmp_path / "fp8-cuda")


def test_gpu_worker_writes_the_cpu_bits(checkpoint, tmp_path: Path) -> None:
    """A real `recast worker` on the GPU (prefork child, CUDA first touched there) against the CPU CLI."""
    import os
    import subprocess
    import sys

    from core.embedded import EmbeddedRedis
    from core.jobstore import JobStore
    from core.queue import make_app
    from core.settings import Settings

    root = Path(__file__).resolve().parent.parent
    src = checkpoint("deepseek-v3", scheme="block")
    api.convert(src, tmp_path / "cpu", api.Options(to="native", device="cpu"))
    with EmbeddedRedis(tmp_path / "redis") as redis_server:
        path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "RECAST_REDIS_URL": redis_server.url, "RECAST_FILE_ROOTS": str(tmp_path.parent),
               "RECAST_SCRATCH_DIR": str(tmp_path / "scratch"), "PYTHONPATH": path}  # fmt: skip
        worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env, cwd=root)
        try:
            store = JobStore.connect(redis_server.url)
            request = {"source": f"file://{src}", "target": f"file://{tmp_path}/gpu", "to": "native"}
            job = store.create(request, {}, None)
            make_app(Settings(redis_url=redis_server.url)).send_task("recast.plan", args=[job["id"]])
            deadline = time.monotonic() + 300
            while (got := store.get(job["id"]))["state"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, got
                time.sleep(0.5)
            assert got["state"] == "succeeded", got.get("error_message")
        finally:
            worker.terminate()
            worker.wait(60)
    assert _shards(tmp_path / "cpu") == _shards(tmp_path / "gpu")
