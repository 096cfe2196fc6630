"""The service's data path under failure, through the real service: Redis restarted mid-job, workers
killed mid-shard again and again, a job the API recorded but never queued; every job finishes with the
CLI's bytes, nothing lost, and each shard's own verification reaches the report."""

from __future__ import annotations

import filecmp
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import Service, submit, wait

from worker.engine import api
from worker.engine.checkpoint import MANIFEST, SIDECAR


@pytest.fixture(scope="module")
def cli_native(checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    src = checkpoint("mistral4")
    out = tmp_path_factory.mktemp("cli") / "native"
    api.convert(src, out, api.Options(to="native", device="cpu"))
    return src, out


@pytest.fixture(scope="module")
def paced(tmp_path_factory) -> Iterator[Service]:
    """Two workers whose reads are paced to 150 kB/s, so a shard takes about two seconds."""
    env = {"RECAST_FILE_ROOTS": str(tmp_path_factory.getbasetemp()), "RECAST_READ_LIMIT_MB_S": "0.15"}
    svc = Service(tmp_path_factory.mktemp("paced"), env)
    try:
        yield svc.start(workers=2)
    finally:
        svc.stop()


def _same_weights(got: Path, want: Path) -> None:
    names = sorted(p.name for p in want.iterdir() if p.name not in (SIDECAR, MANIFEST))
    assert sorted(p.name for p in got.iterdir() if p.name not in (SIDECAR, MANIFEST)) == names
    for name in names:
        assert filecmp.cmp(got / name, want / name, shallow=False), f"{name} differs from the CLI's"


def _until(c: httpx.Client, job_id: str, ok, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if ok(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached the awaited point: {job}")


def test_redis_restart_mid_job_loses_nothing(paced: Service, cli_native, tmp_path: Path) -> None:
    src, want = cli_native
    with paced.client() as c:
        job = submit(c, {"source": f"file://{src}", "target": f"file://{tmp_path}/out", "to": "native"})
        _until(c, job["id"], lambda j: j["progress"]["step"].startswith("converting model-"))
        paced.redis.restart()
        done = wait(c, job["id"], timeout=180)
    assert done["state"] == "succeeded", done["error"]
    _same_weights(tmp_path / "out", want)


def test_workers_killed_mid_shard_again_and_again(paced: Service, cli_native, tmp_path: Path) -> None:
    src, want = cli_native
    kills = 0
    with paced.client() as c:
        for n in range(3):
            job = submit(
                c, {"source": f"file://{src}", "target": f"file://{tmp_path}/out{n}", "to": "native"}
            )
            for _ in range(2):
                if kills == 5:
                    break
                _until(
                    c,
                    job["id"],
                    lambda j: j["state"] != "queued" and "converting model-" in j["progress"]["step"],
                )
                children = [p for w in paced.workers for p in paced.pool_children(w)]
                if children:
                    children[kills % len(children)].kill()
                    kills += 1
            done = wait(c, job["id"], timeout=180)
            assert done["state"] == "succeeded", done["error"]
            _same_weights(tmp_path / f"out{n}", want)
    assert kills == 5


def test_a_job_recorded_but_never_queued_is_swept_up(paced: Service, cli_native, tmp_path: Path) -> None:
    """The API died between recording the job and queueing it: the beat's sweep queues it."""
    from core.jobstore import JobStore
    from core.queue import make_app
    from core.settings import Settings
    from worker import jobs

    src, want = cli_native
    store = JobStore.connect(paced.redis.url)
    request = {"source": f"file://{src}", "target": f"file://{tmp_path}/out", "to": "native"}
    orphan = store.create(request, {}, None)["id"]
    ctx = jobs.Context(store, Settings.from_env(), lambda *_: None, lambda *_: None, lambda *_: None)
    assert jobs.sweep(ctx, lambda _: None) == [], "a fresh job is not stranded yet"
    app = make_app(Settings(redis_url=paced.redis.url))
    assert jobs.sweep(ctx, lambda job_id: app.send_task("recast.plan", args=[job_id]), older_than_s=0) == [
        orphan
    ]
    assert jobs.sweep(ctx, lambda _: None, older_than_s=0) == [], "a swept job is queued once"
    with paced.client() as c:
        done = wait(c, orphan, timeout=180)
    assert done["state"] == "succeeded", done["error"]
    _same_weights(tmp_path / "out", want)


def test_each_shard_verifies_itself_and_finalize_merges(paced: Service, cli_native, tmp_path: Path) -> None:
    """The ledger holds each shard's hash, receipt and per-tensor checks, and the metadata unit's files
    with the kept scales' checks; the report merges them, every source tensor once."""
    import json

    import redis

    from worker import jobs

    src, want = cli_native
    with paced.client() as c:
        job = submit(c, {"source": f"file://{src}", "target": f"file://{tmp_path}/out", "to": "native"})
        done = wait(c, job["id"], timeout=180)
        assert done["state"] == "succeeded", done["error"]
        report = c.get(f"/v1/jobs/{job['id']}/report").json()
    ledger = redis.Redis.from_url(paced.redis.url, decode_responses=True).hgetall(
        f"recast:job:{job['id']}:shards"
    )
    entries = {name: json.loads(v) for name, v in ledger.items()}
    meta = entries.pop(jobs.METADATA)
    assert set(entries) == {p.name for p in want.glob("model-*.safetensors")}
    assert all(f["receipt"] and f["sha256"] for f in meta["files"].values())
    assert {"config.json", "model.safetensors.index.json"} <= set(meta["files"])
    checked = set(meta["verification"])
    for name, entry in entries.items():
        assert entry["receipt"] and entry["verification"], name
        assert not checked & set(entry["verification"]), f"{name}: a tensor checked twice"
        checked |= set(entry["verification"])
    cli = json.loads((want / SIDECAR).read_text())["verification"]
    assert report["summary"]["passed"] and report["summary"]["tensors_checked"] == cli["tensors_checked"]
    assert len(checked) == cli["tensors_checked"]
    _same_weights(tmp_path / "out", want)
