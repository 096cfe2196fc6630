"""End to end through the real service: HTTP API, Redis, Celery worker processes, S3 (moto server) and
a loopback Hub. Every output is compared byte for byte with what the CLI's engine writes."""

from __future__ import annotations

import filecmp
import hashlib
import json
import logging
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import httpx
import pytest
import redis
from harness import ROOT, TOKEN, Service, events, submit, wait
from huggingface_hub import ModelCard
from servers import AWS_TEST_ENV, HubServer, upload_directory

from core.jobstore import JobStore
from worker.celery_app import HEARTBEAT_S
from worker.engine import api
from worker.engine.checkpoint import MANIFEST, SIDECAR

# Files whose bytes depend on where the job ran (source location, timings); everything else must match.
RUN_SPECIFIC = {SIDECAR, MANIFEST}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp()


def _env(roots: Path, s3: str, hub: HubServer, **extra: str) -> dict[str, str]:
    return {
        "RECAST_FILE_ROOTS": str(roots),
        "RECAST_S3_ENDPOINT_URL": s3,
        "RECAST_HF_ENDPOINT": hub.endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        **AWS_TEST_ENV,
        **extra,
    }


# Configured credentials: jobs may name these, and nothing else.
CREDENTIALS = {
    "models-s3": {"type": "s3", "aws_access_key_id": "testing", "aws_secret_access_key": "testing"},
    "hub-bot": {"type": "hf", "token": "hf_0123456789"},
}
CHECK_S = 3  # RECAST_SUBMIT_CHECK_S: how long submission waits for a store's answer


@pytest.fixture(scope="module")
def service(tmp_path_factory, roots, s3_server, hub_server) -> Iterator[Service]:
    credentials = tmp_path_factory.mktemp("credentials") / "credentials.json"
    credentials.write_text(json.dumps(CREDENTIALS))
    env = _env(roots, s3_server, hub_server, RECAST_CREDENTIALS_FILE=str(credentials),
               RECAST_SUBMIT_CHECK_S=str(CHECK_S))  # fmt: skip
    svc = Service(tmp_path_factory.mktemp("svc"), env)
    try:
        yield svc.start(workers=2)
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[httpx.Client]:
    with service.client() as c:
        yield c


@pytest.fixture(scope="module")
def cli_outputs(checkpoint, tmp_path_factory) -> Callable[[str], tuple[Path, Path, Path]]:
    """(source, CLI native output, CLI hf output of that native output) for a family."""
    cache: dict[str, tuple[Path, Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path, Path]:
        if family not in cache:
            src = checkpoint(family)
            out = tmp_path_factory.mktemp(f"cli-{family}")
            api.convert(src, out / "native", api.Options(to="native", device="cpu"))
            api.convert(out / "native", out / "hf", api.Options(to="hf", device="cpu"))
            cache[family] = (src, out / "native", out / "hf")
        return cache[family]

    return get


def assert_same_files(got: Path, want: Path) -> None:
    names = sorted(p.relative_to(want).as_posix() for p in want.rglob("*") if p.is_file())
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == names
    for name in names:
        if name not in RUN_SPECIFIC:
            assert filecmp.cmp(got / name, want / name, shallow=False), f"{name} differs from the CLI's"
    manifest = dict(line.split("  ")[::-1] for line in (got / MANIFEST).read_text().splitlines())
    assert set(manifest) == set(names) - {MANIFEST}


def follow(client: httpx.Client, job_id: str) -> tuple[list[str], dict]:
    states, last = [], {}
    for _, kind, job in events(client, job_id):
        if kind == "state":
            states.append(job["state"])
        last = job
    return states, last


def test_file_jobs_both_directions_match_the_cli(client, cli_outputs, tmp_path):
    src, cli_native, cli_hf = cli_outputs("mistral4")
    job = submit(client, {"source": f"file://{src}", "target": f"file://{tmp_path}/native", "to": "native",
                          "labels": {"team": "e2e"}})  # fmt: skip
    assert job["state"] == "queued" and job["links"]["events"] == f"/v1/jobs/{job['id']}/events"
    states, last = follow(client, job["id"])
    assert states[-4:] == ["running", "verifying", "uploading", "succeeded"], states
    p = last["progress"]
    assert p["shards_done"] == p["shards_total"] == 3 and p["bytes_in"] == p["bytes_total"] > 0
    assert last["adapter"] == "mistral4" and last["error"] is None and last["finished_at"]
    assert_same_files(tmp_path / "native", cli_native)
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["summary"]["passed"] and not report["accounting"]["unaccounted"]
    assert report["direction"] == "hf->native"

    back = submit(
        client, {"source": f"file://{tmp_path}/native", "target": f"file://{tmp_path}/hf", "to": "hf"}
    )
    assert wait(client, back["id"])["state"] == "succeeded"
    assert_same_files(tmp_path / "hf", cli_hf)
    for name in json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values():
        assert filecmp.cmp(tmp_path / "hf" / name, src / name, shallow=False)
    assert not list(tmp_path.glob(".*recast*")), "staging left behind"


def test_mxfp4_jobs_match_the_cli_and_restore_the_source(client, checkpoint, tmp_path):
    src = checkpoint("gpt-oss", scheme="mxfp4")
    api.convert(src, tmp_path / "cli", api.Options(to="native", device="cpu"))
    job = submit(client, {"source": f"file://{src}", "target": f"file://{tmp_path}/native", "to": "native"})
    done = wait(client, job["id"])
    assert done["state"] == "succeeded" and done["adapter"] == "gpt-oss", done["error"]
    assert_same_files(tmp_path / "native", tmp_path / "cli")
    back = submit(
        client, {"source": f"file://{tmp_path}/native", "target": f"file://{tmp_path}/hf", "to": "hf"}
    )
    assert wait(client, back["id"])["state"] == "succeeded"
    for f in src.iterdir():
        assert filecmp.cmp(tmp_path / "hf" / f.name, f, shallow=False), f.name


def test_events_resume_from_last_event_id(client, cli_outputs, tmp_path):
    src, _, _ = cli_outputs("mistral4")
    job = submit(client, {"source": f"file://{src}", "target": f"file://{tmp_path}/out", "to": "native"})
    seen = list(events(client, job["id"]))
    assert [e[0] for e in seen] == sorted(e[0] for e in seen)
    middle = len(seen) // 2
    resumed = list(events(client, job["id"], last_event_id=seen[middle][0]))
    assert [e[0] for e in resumed] == [e[0] for e in seen[middle + 1 :]]


def _download(s3: str, bucket: str, prefix: str, dst: Path) -> None:
    c = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            path = dst / obj["Key"][len(prefix) + 1 :]
            path.parent.mkdir(parents=True, exist_ok=True)
            c.download_file(bucket, obj["Key"], str(path))


def test_s3_to_s3_matches_the_cli(client, cli_outputs, s3_server, tmp_path):
    src, cli_native, _ = cli_outputs("deepseek-v3")
    upload_directory(s3_server, src, "models", "deepseek/fp8")
    body = {"source": "s3://models/deepseek/fp8", "target": "s3://models/deepseek/native", "to": "native"}
    job = submit(client, body)
    done = wait(client, job["id"])
    assert done["state"] == "succeeded", done["error"]
    assert done["result"]["url"].startswith("s3://models/deepseek/native")
    _download(s3_server, "models", "deepseek/native", tmp_path / "got")
    assert_same_files(tmp_path / "got", cli_native)


def test_overwrite_replaces_what_the_target_held(client, cli_outputs, s3_server, tmp_path):
    """``overwrite``: the output replaces an earlier checkpoint, stale files included (file and S3)."""
    src, cli_native, _ = cli_outputs("mistral4")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.safetensors").write_bytes(b"old")
    upload_directory(s3_server, cli_native, "models", "over/native")
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.put_object(Bucket="models", Key="over/native/stale.bin", Body=b"old")
    for target in (f"file://{tmp_path}/out", "s3://models/over/native"):
        body = {"source": f"file://{src}", "target": target, "to": "native"}
        assert client.post("/v1/jobs", json=body).status_code == 409
        done = wait(client, submit(client, {**body, "overwrite": True})["id"])
        assert done["state"] == "succeeded", done["error"]
    assert_same_files(tmp_path / "out", cli_native)
    _download(s3_server, "models", "over/native", tmp_path / "got")
    assert_same_files(tmp_path / "got", cli_native)


def test_hub_source_is_pinned_and_matches_the_cli(client, cli_outputs, hub_server, tmp_path):
    src, cli_native, _ = cli_outputs("mistral3-fp8")
    sha = hub_server.add_repo("mistralai/tiny-fp8", src)
    job = submit(
        client, {"source": "hf://mistralai/tiny-fp8", "target": f"file://{tmp_path}/out", "to": "native"}
    )
    assert job["source_revision"] == sha
    done = wait(client, job["id"])
    assert done["state"] == "succeeded", done["error"]
    assert_same_files(tmp_path / "out", cli_native)
    sidecar = json.loads((tmp_path / "out" / SIDECAR).read_text())
    assert sidecar["source"]["revision"] == sha


def test_a_store_that_fails_for_a_while_is_retried_end_to_end(client, cli_outputs, hub_server, tmp_path):
    """The Hub answers 503 for one shard for a few seconds: the shard task backs off, retries, succeeds."""
    import threading

    src, cli_native, _ = cli_outputs("mistral4")
    sha = hub_server.add_repo("team/flaky", src)
    shard = f"/team/flaky/resolve/{sha}/model-00002-of-00003.safetensors"
    hub_server.faults[shard] = 503
    threading.Timer(4.0, lambda: hub_server.faults.pop(shard, None)).start()
    job = submit(client, {"source": "hf://team/flaky", "target": f"file://{tmp_path}/out", "to": "native"})
    done = wait(client, job["id"])
    assert done["state"] == "succeeded", done["error"]
    assert any(method == "GET" and path == shard for method, path, _ in hub_server.log), (
        "the fault was never hit"
    )
    assert_same_files(tmp_path / "out", cli_native)


def test_idempotency_key(client, cli_outputs, tmp_path):
    src, _, _ = cli_outputs("mistral4")
    body = {"source": f"file://{src}", "target": f"file://{tmp_path}/out", "to": "native"}
    first = submit(client, body, **{"Idempotency-Key": "abc-1"})
    again = submit(client, body, **{"Idempotency-Key": "abc-1"})
    assert again["id"] == first["id"]
    other = client.post("/v1/jobs", json={**body, "dtype": "fp32"}, headers={"Idempotency-Key": "abc-1"})
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    assert wait(client, first["id"])["state"] == "succeeded"


def test_workers_and_a_jobs_throughput_are_reported(service, client, cli_outputs, tmp_path):
    """GET /v1/workers lists the real worker processes from their own heartbeats: host, pid, device, and
    the shards each converted; a job's throughput series runs from its start at 0 bytes to the bytes its
    shards read, with rates between the samples."""
    src, _, _ = cli_outputs("mistral4")
    before = {w["name"]: w["shards_done"] for w in client.get("/v1/workers").json()["workers"]}
    job = submit(client, {"source": f"file://{src}", "target": f"file://{tmp_path}/out", "to": "native"})
    done = wait(client, job["id"])
    assert done["state"] == "succeeded", done["error"]
    assert done["progress"]["throughput_bytes_s"] is None and done["progress"]["eta_s"] is None  # not running
    fleet = client.get("/v1/workers").json()
    pids = {p.pid for w in service.workers for p in service.pool_children(w)} | {
        w.pid for w in service.workers
    }
    alive = [w for w in fleet["workers"] if w["alive"]]
    assert len(alive) == 2 and all(w["pid"] in pids for w in alive), fleet
    assert all(w["host"] == socket.gethostname() and w["device"] == "cpu" for w in alive)
    assert sum(w["shards_done"] - before.get(w["name"], 0) for w in alive) >= done["progress"]["shards_total"]
    assert all(w["converting"] == [] and w["slots"] == 2 for w in alive)  # idle again; 2 shards at once
    assert fleet["queue"] == {"jobs_queued": 0, "jobs_active": 0, "work_units_queued": 0}
    points = client.get(f"/v1/jobs/{job['id']}/throughput").json()["points"]
    assert len(points) >= 2 and points[0]["bytes_in"] == 0 and points[0]["bytes_per_s"] is None
    # The shards' progress counts the tensor bytes they read (finalize then records the checkpoint's total).
    assert 0.99 * done["progress"]["bytes_total"] <= points[-1]["bytes_in"] <= done["progress"]["bytes_total"]
    assert all(p["bytes_per_s"] is not None and p["bytes_per_s"] >= 0 for p in points[1:])
    assert client.get("/v1/jobs/nope/throughput").json()["code"] == "job_not_found"


def test_auth_problems_and_open_endpoints(service):
    with service.client(token=None) as anon, service.client(token="wrong") as wrong:
        for c in (anon, wrong):
            r = c.get("/v1/jobs")
            assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
            assert r.headers["www-authenticate"] == "Bearer" and r.json()["code"] == "unauthorized"
        assert anon.get("/healthz").status_code == 200
        assert anon.get("/readyz").json()["checks"]["workers"] >= 2
        assert "recast_jobs" in anon.get("/metrics").text
        spec = anon.get("/openapi.json").json()
        assert {"/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/inspect", "/v1/adapters"} <= set(spec["paths"])


def test_bad_requests_name_the_field(client, cli_outputs, tmp_path):
    src, _, _ = cli_outputs("mistral4")
    cases = [
        ({"source": "ftp://x/y", "target": f"file://{tmp_path}/o", "to": "native"}, "source"),
        ({"source": f"file://{src}", "target": "file:///etc/recast", "to": "native"}, "target"),
        ({"source": f"file://{src}", "target": f"file://{tmp_path}/o", "to": "sideways"}, "to"),
        (
            {
                "source": f"file://{src}",
                "target": f"file://{tmp_path}/o",
                "to": "native",
                "aws_secret_access_key": "hunter2",
            },
            "aws_secret_access_key",
        ),
        (
            {"source": f"file://{src}", "target": f"file://{tmp_path}/o", "to": "native", "adapter": "gpt9"},
            "adapter",
        ),
    ]
    for body, field in cases:
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert field in r.json()["detail"] and "hunter2" not in r.text


def test_bad_checkpoint_fails_the_job_with_the_engines_error(client, cli_outputs, tmp_path):
    src, _, _ = cli_outputs("mistral4")
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in src.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    shard = broken / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    job = submit(client, {"source": f"file://{broken}", "target": f"file://{tmp_path}/out", "to": "native"})
    done = wait(client, job["id"])
    assert done["state"] == "failed" and done["error"]["code"] == "bad_checkpoint"
    assert "model-00002-of-00003.safetensors" in done["error"]["message"]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_adapter_mismatch_fails_the_job(client, cli_outputs, tmp_path):
    src, _, _ = cli_outputs("mistral4")
    body = {"source": f"file://{src}", "target": f"file://{tmp_path}/out", "to": "native"}
    done = wait(client, submit(client, {**body, "adapter": "deepseek-v3"})["id"])
    assert done["state"] == "failed" and done["error"]["code"] == "adapter_mismatch"
    assert "gate_up_proj" in done["error"]["message"]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_listing_filters_and_pages(client, cli_outputs, tmp_path):
    src, _, _ = cli_outputs("mistral4")
    ids = [submit(client, {"source": f"file://{src}", "target": f"file://{tmp_path}/o{i}", "to": "native",
                           "labels": {"batch": "listing"}})["id"] for i in range(3)]  # fmt: skip
    for i in ids:
        wait(client, i)
    page = client.get("/v1/jobs", params={"label": "batch=listing", "limit": 2}).json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    rest = client.get("/v1/jobs", params={"label": "batch=listing", "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["jobs"]] == ids[:1] and rest["next_cursor"] is None
    done = client.get("/v1/jobs", params={"state": "succeeded", "limit": 200}).json()["jobs"]
    assert set(ids) <= {j["id"] for j in done} and all(j["state"] == "succeeded" for j in done)


def test_adapters_and_inspect(client, cli_outputs):
    src, _, _ = cli_outputs("mistral4")
    families = {a["name"]: a for a in client.get("/v1/adapters").json()}
    assert "deepseek-v3" in families and families["qwen3-moe"]["model_types"] == ["qwen3_moe"]
    assert families["qwen3-moe"]["detection"].startswith("architectures Qwen3MoeForCausalLM")
    info = client.post("/v1/inspect", json={"source": f"file://{src}"}).json()
    assert info["adapter"] == "mistral4" and info["shards"] == 3


# ------------------------------------------------------------------------- refused at submit, not later


def _refused(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["code"] == code and problem["status"] == status, problem
    return problem


def test_submit_refuses_what_cannot_work(client, cli_outputs, tmp_path):
    src, _, _ = cli_outputs("mistral4")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    bad_shard = tmp_path / "bad-shard"
    bad_shard.mkdir()
    (bad_shard / "config.json").write_text("{}")
    (bad_shard / "model.safetensors").write_bytes(b"\xff" * 64)
    full = tmp_path / "full"
    full.mkdir()
    (full / "model.safetensors").write_bytes(b"something already here")
    body = {"source": f"file://{src}", "target": f"file://{tmp_path}/out", "to": "native",
            "labels": {"case": "refused"}}  # fmt: skip
    cases = [
        ({"source": f"file://{tmp_path}/missing"}, 422, "source_not_found", "source"),
        ({"source": "s3://nowhere/at/all"}, 422, "source_not_found", "source"),
        ({"source": "hf://team/never-created"}, 422, "source_not_found", "source"),
        ({"source": f"file://{config_only}"}, 422, "not_a_checkpoint", "model.safetensors"),
        ({"source": f"file://{bad_shard}"}, 422, "not_a_checkpoint", "model.safetensors"),
        ({"source": f"file://{src}/config.json"}, 422, "source_not_found", "source"),
        ({"target": f"file://{full}"}, 409, "target_not_empty", "overwrite"),
        ({"adapter": "gpt9"}, 422, "adapter_unknown", "adapter"),
        ({"source": "ftp://x/y"}, 422, "invalid_location", "source"),
        ({"target_credential": "nobody"}, 422, "credential_unknown", "target_credential"),
        ({"source": "s3://models/any", "source_credential": "hub-bot"}, 422, "credential_invalid", "hub-bot"),
    ]
    for change, status, code, word in cases:
        started = time.monotonic()
        problem = _refused(client.post("/v1/jobs", json={**body, **change}), status, code)
        assert word in problem["detail"], problem
        assert time.monotonic() - started < CHECK_S, f"{code}: the check took too long"
    assert client.get("/v1/jobs", params={"label": "case=refused"}).json()["jobs"] == []
    assert _refused(client.post("/v1/jobs", json={**body, "adapter": "gpt9"}), 422, "adapter_unknown")[
        "allowed"
    ]
    # With overwrite, a non-empty target is accepted: the job replaces it when it publishes.
    accepted = submit(client, {**body, "target": f"file://{full}", "overwrite": True, "labels": {}})
    assert accepted["request"]["overwrite"] is True
    client.post(f"/v1/jobs/{accepted['id']}/cancel")


def test_a_slow_store_leaves_the_check_to_the_worker(client, cli_outputs, hub_server, tmp_path):
    src, _, _ = cli_outputs("mistral3-fp8")
    sha = hub_server.add_repo("team/slow-listing", src)
    hub_server.stalls[f"/api/models/team/slow-listing/tree/{sha}"] = CHECK_S + 5
    started = time.monotonic()
    try:
        job = submit(
            client, {"source": "hf://team/slow-listing", "target": f"file://{tmp_path}/out", "to": "native"}
        )
    finally:
        hub_server.stalls.clear()
    assert CHECK_S - 0.5 < time.monotonic() - started < CHECK_S + 3
    done = wait(client, job["id"])
    assert done["state"] == "succeeded", done["error"]


def test_inspect_answers_with_specific_codes(client, tmp_path):
    _refused(
        client.post("/v1/inspect", json={"source": f"file://{tmp_path}/missing"}), 422, "source_not_found"
    )
    (tmp_path / "config.json").write_text("{}")
    _refused(client.post("/v1/inspect", json={"source": f"file://{tmp_path}"}), 422, "not_a_checkpoint")
    _refused(client.post("/v1/inspect", json={"source": "ftp://x"}), 422, "invalid_location")


def test_schedule_over_a_prefix_without_a_pattern_converts_the_newest(client, cli_outputs, tmp_path):
    src, cli_native, _ = cli_outputs("mistral4")
    shutil.copytree(src, tmp_path / "runs" / "step-1")
    template = {
        "source": f"file://{tmp_path}/runs",
        "target": f"file://{tmp_path}/served/{{name}}",
        "to": "native",
    }
    bad = {**template, "source_credential": "AKIAIOSFODNN7EXAMPLE"}
    r = client.post("/v1/schedules", json={"name": "bad", "cron": "0 3 * * *", "template": bad})
    assert "template.source_credential" in _refused(r, 422, "credential_unknown")["detail"]
    assert "AKIAIOSFODNN7EXAMPLE" not in r.text
    sched = client.post(
        "/v1/schedules", json={"name": "no-pattern", "cron": "0 3 * * *", "template": template}
    )
    assert sched.status_code == 201, sched.text
    firing = client.post(f"/v1/schedules/{sched.json()['id']}/run").json()
    assert firing["error"] is None and firing["source"] == f"file://{tmp_path}/runs/step-1", firing
    done = wait(client, firing["job_id"])
    assert done["state"] == "succeeded", done["error"]
    assert_same_files(tmp_path / "served" / "step-1", cli_native)
    client.delete(f"/v1/schedules/{sched.json()['id']}")


# ---------------------------------------------------------------------------------- credentials by name


SECRET = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def api_logs() -> Iterator[_Captured]:
    """Everything the API in this process logs, at every level (uvicorn's loggers do not propagate)."""
    handler = _Captured()
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


def _redis_contents(r: redis.Redis) -> str:
    """Every key and value in Redis, whatever its type, as text."""
    out = []
    for key in r.scan_iter("*"):
        kind = r.type(key)
        value = {
            b"string": lambda k: r.get(k),
            b"hash": lambda k: r.hgetall(k),
            b"list": lambda k: r.lrange(k, 0, -1),
            b"set": lambda k: r.smembers(k),
            b"zset": lambda k: r.zrange(k, 0, -1, withscores=True),
            b"stream": lambda k: r.xrange(k),
        }[kind](key)
        out.append(f"{key!r} {value!r}")
    return "\n".join(out)


def test_credentials_are_names_never_values(service, client, cli_outputs, tmp_path, api_logs):
    src, _, _ = cli_outputs("mistral4")
    body = {"source": f"file://{src}", "target": f"file://{tmp_path}/out", "to": "native"}
    for field, value in (("source_credential", SECRET), ("target_credential", SECRET_KEY)):
        r = client.post(
            "/v1/jobs", json={**body, field: value}, headers={"Idempotency-Key": f"creds-{field}"}
        )
        problem = _refused(r, 422, "credential_unknown")
        assert field in problem["detail"] and "hub-bot, models-s3" in problem["detail"]
        assert problem["allowed"] == ["hub-bot", "models-s3"]
        assert value not in r.text
    r = client.post("/v1/inspect", json={"source": f"file://{src}", "source_credential": SECRET})
    assert SECRET not in _refused(r, 422, "credential_unknown")["detail"] and SECRET not in r.text
    listed = client.get("/v1/jobs", params={"limit": 200}).text
    assert SECRET not in listed and SECRET_KEY not in listed
    contents = _redis_contents(redis.Redis.from_url(service.redis.url))
    assert SECRET not in contents and SECRET_KEY not in contents
    aof = b"".join(p.read_bytes() for p in service.redis.data_dir.rglob("*") if p.is_file())
    assert SECRET.encode() not in aof and SECRET_KEY.encode() not in aof
    logged = "\n".join(api_logs.lines)
    assert "/v1/inspect" in logged, "the access log was not captured"
    assert SECRET not in logged and SECRET_KEY not in logged
    # A configured name is accepted, and it is all that is stored.
    job = submit(client, {**body, "source_credential": "models-s3"})
    assert job["request"]["source_credential"] == "models-s3"
    assert wait(client, job["id"])["state"] == "succeeded"


# ----------------------------------------------------------------------------------- event streams end


def test_event_stream_of_a_finished_job_ends(service, client, cli_outputs, tmp_path):
    src, _, _ = cli_outputs("mistral4")
    job = submit(client, {"source": f"file://{src}", "target": f"file://{tmp_path}/out", "to": "native"})
    seen = list(events(client, job["id"]))
    assert seen[-1][2]["state"] == "succeeded"
    # Resumed at, or after, the last event: nothing more will come, so the stream ends at once (a stream
    # that only sends keepalives times out here: the first one would come after 15 s).
    for after in (seen[-1][0], "99999999999999-0"):
        started = time.monotonic()
        assert list(events(client, job["id"], last_event_id=after, timeout=5)) == []
        assert time.monotonic() - started < 3
    r = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "not-an-id"})
    _refused(r, 422, "invalid_request")


def test_event_stream_ends_when_the_job_is_deleted(service, client):
    store = JobStore.connect(service.redis.url)
    rec = store.create(
        {"source": "file:///x", "target": "file:///y", "to": "native"}, {}, None
    )  # never queued
    deleted = threading.Timer(1, store.r.delete, [JobStore.key(rec["id"]), JobStore.key(rec["id"], "events")])
    deleted.start()
    try:
        assert [e[2]["state"] for e in events(client, rec["id"], timeout=5)] == ["queued"]
    finally:
        deleted.cancel()
        store.r.zrem("recast:jobs:all", rec["id"])
        store.r.zrem("recast:jobs:state:queued", rec["id"])
    _refused(client.get(f"/v1/jobs/{rec['id']}/events"), 404, "job_not_found")


# ------------------------------------------------------------------------- a client generated from the schema


OPERATIONS = {
    ("post", "/v1/jobs"): "submit_job", ("get", "/v1/jobs"): "list_jobs", ("get", "/v1/jobs/{job_id}"): "get_job",
    ("post", "/v1/jobs/{job_id}/cancel"): "cancel_job", ("get", "/v1/jobs/{job_id}/report"): "get_job_report",
    ("get", "/v1/jobs/{job_id}/events"): "job_events", ("post", "/v1/inspect"): "inspect_checkpoint",
    ("get", "/v1/adapters"): "list_adapters", ("post", "/v1/schedules"): "create_schedule",
    ("get", "/v1/workers"): "list_workers", ("get", "/v1/jobs/{job_id}/throughput"): "get_job_throughput",
}  # fmt: skip


def test_a_generated_client_submits_follows_and_lists(service, cli_outputs, tmp_path, monkeypatch):
    spec = httpx.get(f"{service.url}/openapi.json").json()
    for (method, path), name in OPERATIONS.items():
        assert spec["paths"][path][method]["operationId"] == name
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, operations in spec["paths"].items():
        for op in operations.values():
            assert not path.startswith("/v1/") or "401" in op["responses"], op["operationId"]
            for status, answer in op["responses"].items():
                assert not status.startswith("4") or answer["content"] == problem, (op["operationId"], status)
    (tmp_path / "openapi.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", "openapi.json", "--output-path",
         "recast_client", "--meta", "none"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "warning" not in said.lower() and "error" not in said.lower(), said
    monkeypatch.syspath_prepend(str(tmp_path))
    from recast_client import AuthenticatedClient
    from recast_client.api.jobs import get_job, get_job_throughput, list_jobs, submit_job
    from recast_client.api.workers import list_workers
    from recast_client.models import (
        Format,
        Job,
        JobPage,
        JobRequest,
        JobRequestLabels,
        JobResult,
        JobState,
        JobThroughput,
        Problem,
        WorkerList,
    )

    src, _, _ = cli_outputs("mistral4")
    labels = JobRequestLabels()
    labels["client"] = "generated"
    request = JobRequest(
        source=f"file://{src}", target=f"file://{tmp_path}/out", to=Format.NATIVE, labels=labels
    )
    with AuthenticatedClient(base_url=service.url, token=TOKEN, raise_on_unexpected_status=True) as api:
        job = submit_job.sync(client=api, body=request)
        assert isinstance(job, Job) and job.state == JobState.QUEUED, job
        deadline = time.monotonic() + 240
        while job.state not in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
            job = get_job.sync(client=api, job_id=job.id)
            assert isinstance(job, Job)
        assert job.state == JobState.SUCCEEDED and isinstance(job.result, JobResult), job.error
        assert job.request.to == Format.NATIVE and job.progress.shards_done == 3
        page = list_jobs.sync(client=api, label="client=generated")
        assert isinstance(page, JobPage) and [j.id for j in page.jobs] == [job.id]
        assert all(isinstance(j, Job) for j in page.jobs)
        refused = submit_job.sync(client=api, body=JobRequest(source=f"file://{tmp_path}/none", target=request.target,
                                                             to=Format.NATIVE))  # fmt: skip
        assert isinstance(refused, Problem) and refused.code == "source_not_found"
        fleet = list_workers.sync(client=api)
        assert isinstance(fleet, WorkerList) and sum(w.alive for w in fleet.workers) == 2
        assert fleet.queue.work_units_queued >= 0
        series = get_job_throughput.sync(client=api, job_id=job.id)
        assert isinstance(series, JobThroughput) and series.points[0].bytes_in == 0


# --------------------------------------------------------------------------- slow workers: mid-job events


@pytest.fixture(scope="module")
def slow(tmp_path_factory, roots, s3_server, hub_server) -> Iterator[Service]:
    """Workers whose source reads are paced to 150 kB/s, so a shard takes about two seconds."""
    env = _env(roots, s3_server, hub_server, RECAST_READ_LIMIT_MB_S="0.15")
    svc = Service(tmp_path_factory.mktemp("slow"), env)
    try:
        yield svc.start(workers=2)
    finally:
        svc.stop()


def _running_shard(c: httpx.Client, job_id: str) -> dict:
    for _, _, job in events(c, job_id):
        if job["progress"]["step"].startswith("converting model-") and job["progress"]["shards_done"] == 0:
            return job
    raise AssertionError("job ended before a shard was under way")


def test_cancel_mid_job_removes_partial_output(slow, cli_outputs, tmp_path):
    src, _, _ = cli_outputs("mistral4")
    with slow.client() as c:
        job = submit(c, {"source": f"file://{src}", "target": f"file://{tmp_path}/out", "to": "native"})
        _running_shard(c, job["id"])
        r = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 202 and r.json()["state"] == "cancelling"
        done = wait(c, job["id"])
        assert done["state"] == "cancelled"
        assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelled"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_hub_repo_is_one_target_in_any_case(slow, cli_outputs, hub_server):
    """The Hub matches repo ids without regard to case, so while a job writes hf://team/Case-Target,
    a submission to hf://TEAM/case-target is refused as busy rather than run beside it."""
    src, _, _ = cli_outputs("mistral4")
    hub_server.add_repo("team/Case-Target")
    with slow.client() as c:
        job = submit(c, {"source": f"file://{src}", "target": "hf://team/Case-Target", "to": "native"})
        _running_shard(c, job["id"])  # planned: its worker holds the claim
        other = {"source": f"file://{src}", "target": "hf://TEAM/case-target", "to": "native"}
        r = c.post("/v1/jobs", json=other)
        assert r.status_code == 409 and r.json()["code"] == "target_busy", r.text
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        assert wait(c, job["id"])["state"] == "cancelled"


def test_worker_killed_mid_shard_costs_only_that_shard(slow, cli_outputs, tmp_path):
    src, cli_native, _ = cli_outputs("mistral4")
    with slow.client() as c:
        job = submit(c, {"source": f"file://{src}", "target": f"file://{tmp_path}/out", "to": "native"})
        _running_shard(c, job["id"])
        children = slow.pool_children(slow.workers[0])
        assert children, "the worker has no pool process"
        for child in children:
            child.kill()
        done = wait(c, job["id"])
        assert done["state"] == "succeeded", done["error"]
        assert_same_files(tmp_path / "out", cli_native)
        # the killed processes' units are cleared by their worker's next heartbeat
        deadline = time.monotonic() + 3 * HEARTBEAT_S
        while busy := [w for w in c.get("/v1/workers").json()["workers"] if w["converting"]]:
            assert time.monotonic() < deadline, busy
            time.sleep(0.5)
    r = redis.Redis.from_url(slow.redis.url, decode_responses=True)
    unfinished = {k: int(v) for k, v in r.hgetall(f"recast:job:{job['id']}:attempts").items() if int(v)}
    assert unfinished, "the kill did not interrupt a unit of work"
    ledger = r.hgetall(f"recast:job:{job['id']}:shards")
    ledger.pop("@metadata")
    workers = {json.loads(v)["worker"] for v in ledger.values()}
    assert len(ledger) == 3 and len(workers) >= 2, "both workers should share the job's shards"


def test_token_is_never_stored(slow):
    r = redis.Redis.from_url(slow.redis.url)
    for key in r.scan_iter("recast:*"):
        kind = r.type(key)
        blob = repr(r.hgetall(key) if kind == b"hash" else r.get(key) if kind == b"string" else b"")
        assert TOKEN not in blob


def test_hub_target_is_one_pull_request(client, cli_outputs, hub_server):
    src, cli_native, _ = cli_outputs("mistral4")
    base = hub_server.add_repo("team/tiny-native")
    job = submit(client, {"source": f"file://{src}", "target": "hf://team/tiny-native", "to": "native",
                          "create_pr": True, "commit_message": "Add native weights"})  # fmt: skip
    done = wait(client, job["id"])
    assert done["state"] == "succeeded", done["error"]
    repo = hub_server.repos["team/tiny-native"]
    assert repo.refs["main"] == base and repo.refs["refs/pr/1"] == done["result"]["commit"]
    assert done["result"]["pr_url"].endswith("/team/tiny-native/discussions/1")
    files = hub_server.files("team/tiny-native", "refs/pr/1")
    for p in cli_native.iterdir():
        if p.name not in RUN_SPECIFIC:
            assert files[p.name] == p.read_bytes(), p.name
    assert {SIDECAR, MANIFEST} <= set(files)


def _published_manifest(files: dict[str, bytes]) -> str:
    """SHA256SUMS as published, after checking it against every published file but the card."""
    manifest = files[MANIFEST].decode()
    listed = dict(reversed(line.split("  ", 1)) for line in manifest.splitlines())
    assert set(listed) == set(files) - {".gitattributes", "README.md", MANIFEST}
    for name, sha in listed.items():
        assert hashlib.sha256(files[name]).hexdigest() == sha, name
    return manifest


def test_hub_target_gets_a_model_card(client, cli_outputs, hub_server, tmp_path):
    """A Hub target's README.md says where the checkpoint came from (the source repo and pinned commit),
    how it was converted and checked, and lists the manifest; the source's own card is kept below it. A
    repository's README.md is replaced only with overwrite."""
    src, _, _ = cli_outputs("mistral4")
    vendor = tmp_path / "vendor"
    shutil.copytree(src, vendor)
    (vendor / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# Tiny FP8\n\nThe vendor's words.\n")
    sha = hub_server.add_repo("vendor/tiny-fp8", vendor)
    hub_server.add_repo("team/tiny-card")
    job = submit(client, {"source": "hf://vendor/tiny-fp8", "target": "hf://team/tiny-card", "to": "native"})
    done = wait(client, job["id"])
    assert done["state"] == "succeeded", done["error"]
    assert done["result"]["model_card"] is True
    files = hub_server.files("team/tiny-card")
    card = ModelCard(files["README.md"].decode())
    # Dequantized from FP8: based on the source, but not a quantization of it.
    assert card.data.to_dict() == {"base_model": "vendor/tiny-fp8", "tags": ["recast", "native"]}
    assert f"at commit [`{sha}`]({hub_server.endpoint}/vendor/tiny-fp8/tree/{sha})" in card.text
    for row in ("| adapter | `mistral4` |", "| direction | hf → native |", "| dtype | bf16 (",
                "| scheme | none (not quantized) |", "| format | NeMo AutoModel native layout"):  # fmt: skip
        assert row in card.text, row
    assert "**Passed**" in card.text and "unaccounted 0" in card.text
    assert _published_manifest(files) in card.text
    assert card.text.index("## Original model card") < card.text.index("The vendor's words.")
    assert "license: apache-2.0" not in card.text  # the vendor's front matter is not ours

    # Back to FP8 from the Hub: now a quantization of the native repo. A README.md there stays...
    hub_server.add_repo("team/tiny-fp8-again", _readme_only(tmp_path / "theirs", "Our own card.\n"))
    body = {"source": "hf://team/tiny-card", "target": "hf://team/tiny-fp8-again", "to": "hf"}
    kept = wait(client, submit(client, body)["id"])
    assert kept["state"] == "succeeded", kept["error"]
    assert kept["result"]["model_card"] is False
    assert hub_server.files("team/tiny-fp8-again")["README.md"] == b"Our own card.\n"
    # ... unless the job may overwrite (another repo: the same output on the same branch counts as
    # published already, see HubTarget._published).
    hub_server.add_repo("team/tiny-fp8-over", _readme_only(tmp_path / "over", "Our own card.\n"))
    done = wait(
        client, submit(client, {**body, "target": "hf://team/tiny-fp8-over", "overwrite": True})["id"]
    )
    assert done["state"] == "succeeded", done["error"]
    assert done["result"]["model_card"] is True
    files = hub_server.files("team/tiny-fp8-over")
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "team/tiny-card" and card.data.base_model_relation == "quantized"
    assert card.data.library_name == "transformers" and "fp8" in card.data.tags
    assert (
        "| direction | native → hf |" in card.text
        and "| format | Hugging Face safetensors, `fp8`" in card.text
    )
    assert "| scheme | weights per tensor" in card.text
    assert _published_manifest(files) in card.text


def _readme_only(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "README.md").write_text(text)
    return path


# ------------------------------------------------------------------------------------------- schedules


def test_schedule_converts_the_newest_checkpoint_once_per_revision(service, client, checkpoint, s3_server):
    src = checkpoint("mistral4")
    upload_directory(s3_server, src, "train", "run1/step-100")
    upload_directory(s3_server, src, "train", "run1/step-200")
    upload_directory(s3_server, src, "train", "run1/other-300")
    template = {"source": "s3://train/run1", "source_pattern": "step-*", "target": "s3://serve/run1/{name}",
                "to": "native", "labels": {"pipeline": "nightly"}}  # fmt: skip
    bad_target = {**template, "target": "s3://serve/x"}
    for bad, field in (({"cron": "61 * * * *"}, "cron"), ({"template": bad_target}, "target")):
        r = client.post(
            "/v1/schedules", json={"name": "bad", "cron": "0 3 * * *", "template": template, **bad}
        )
        assert r.status_code == 422 and field in r.json()["detail"], r.text
    r = client.post("/v1/schedules", json={"name": "nightly", "cron": "0 3 * * *", "template": template})
    assert r.status_code == 201, r.text
    sched = r.json()
    assert sched["next_run_at"] and client.get("/v1/schedules").json()["schedules"][0]["id"] == sched["id"]
    rds = redis.Redis.from_url(service.redis.url)
    assert rds.exists(f"recast:redbeat:recast-schedule-{sched['id']}")
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="serve")

    first = client.post(f"/v1/schedules/{sched['id']}/run").json()
    assert first["source"] == "s3://train/run1/step-200" and first["job_id"], first
    job = wait(client, first["job_id"])
    assert job["state"] == "succeeded" and job["labels"] == {"pipeline": "nightly", "schedule": sched["id"]}
    assert job["request"]["target"] == "s3://serve/run1/step-200"
    again = client.post(f"/v1/schedules/{sched['id']}/run").json()
    assert again["skipped_reason"] and again["job_id"] == first["job_id"]
    upload_directory(s3_server, src, "train", "run1/step-300")
    third = client.post(f"/v1/schedules/{sched['id']}/run").json()
    assert third["source"] == "s3://train/run1/step-300" and third["job_id"] != first["job_id"]
    assert wait(client, third["job_id"])["state"] == "succeeded"
    firings = client.get(f"/v1/schedules/{sched['id']}/firings").json()["firings"]
    assert [f["job_id"] for f in firings] == [third["job_id"], first["job_id"], first["job_id"]]

    paused = client.patch(f"/v1/schedules/{sched['id']}", json={"paused": True}).json()
    assert paused["paused"] and paused["next_run_at"] is None
    assert 'recast_schedule_firings_total{outcome="skipped"}' in client.get("/metrics").text
    assert client.delete(f"/v1/schedules/{sched['id']}").status_code == 204
    assert client.get(f"/v1/schedules/{sched['id']}").status_code == 404
    assert not rds.exists(f"recast:redbeat:recast-schedule-{sched['id']}")


def test_beat_fires_a_schedule(service, client, cli_outputs, hub_server, tmp_path):
    """A real `recast beat` (celery-redbeat) fires an every-minute schedule for a Hub repo's newest revision."""
    src, _, _ = cli_outputs("mistral3-fp8")
    sha = hub_server.add_repo("team/nightly", src)
    template = {"source": "hf://team/nightly", "target": f"file://{tmp_path}/{{revision}}", "to": "native"}
    sched = client.post(
        "/v1/schedules", json={"name": "beat", "cron": "* * * * *", "template": template}
    ).json()
    beat = subprocess.Popen([sys.executable, "-m", "worker.cli", "beat"], env=service.env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not (firings := client.get(f"/v1/schedules/{sched['id']}/firings").json()["firings"]):
            assert time.monotonic() < deadline, "the beat never fired"
            time.sleep(1)
    finally:
        beat.terminate()
        beat.wait(30)
    assert not firings[0]["manual"] and firings[0]["source_revision"] == sha
    assert wait(client, firings[0]["job_id"])["state"] == "succeeded"
    assert (tmp_path / sha[:12] / "model.safetensors.index.json").exists()
    client.delete(f"/v1/schedules/{sched['id']}")
