"""The API's limits (README, Limits): request bodies, headers, labels and every string a body carries.

Each is refused as a problem the client can act on, before anything is parsed or run where the size
is known up front; checked against the service under uvicorn (a real Redis, no workers: accepted jobs
stay queued), since the header limits live in the HTTP server.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Service, submit

from service.schemas import (
    MAX_BODY_BYTES,
    MAX_COMMIT_MESSAGE,
    MAX_CRON,
    MAX_HEAD_BYTES,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_LOCATION,
    MAX_NAME,
    MAX_PATTERN,
)
from worker.sample import write_sample

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("limits-files")
    write_sample(root / "ckpts" / "step-1")
    svc = Service(tmp_path_factory.mktemp("limits-svc"), {"RECAST_FILE_ROOTS": str(root)})
    try:
        yield svc.start(workers=0)
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def client(api: Service) -> Iterator[httpx.Client]:
    with api.client() as c:
        yield c


@pytest.fixture(scope="module")
def root(api: Service) -> Path:
    return Path(api.env["RECAST_FILE_ROOTS"])


def _job(root: Path, **fields: Any) -> dict[str, Any]:
    """A request the service accepts (the sample checkpoint to a new target), with ``fields`` changed."""
    return {"source": f"file://{root}/ckpts/step-1", "target": f"file://{root}/out/{time.monotonic_ns()}",
            "to": "native", **fields}  # fmt: skip


def _refused(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    problem = r.json()
    assert problem["code"] == code and problem["status"] == status, problem
    return problem


def _invalid_fields(r: httpx.Response) -> set[str]:
    return {e["field"] for e in _refused(r, 422, "invalid_request")["errors"]}


def test_a_target_that_a_running_job_writes_is_busy(api, client, root):
    """While a job writes a target (its worker claimed it when planning), another submission to the same
    target is refused with 409 target_busy; a job that has ended holds nothing."""
    from core.jobstore import JobStore

    body = _job(root)
    first = client.post("/v1/jobs", json=body)
    assert first.status_code == 202, first.text
    store = JobStore.connect(api.redis.url)
    store.transition(first.json()["id"], ("queued",), "running")  # as its worker's plan would
    claim = store.get(first.json()["id"])["target_claim"]  # the target's canonical URL
    assert store.claim_target(first.json()["id"], claim) is None
    problem = _refused(client.post("/v1/jobs", json=body), 409, "target_busy")
    assert first.json()["id"] in problem["detail"]
    respelled = {**body, "target": body["target"].replace("file:///", "file://localhost/") + "/"}
    _refused(client.post("/v1/jobs", json=respelled), 409, "target_busy")  # one location, another spelling
    store.transition(first.json()["id"], ("running",), "failed", error_code="e", error_message="m")
    assert client.post("/v1/jobs", json=body).status_code == 202


# ------------------------------------------------------------------------------------------- bodies


def test_a_body_over_the_limit_is_refused_before_it_is_parsed(client, root):
    queued = submit(client, _job(root))
    # Declared too large: refused before any route runs, so this cancel does not happen.
    big = b"{" + b" " * MAX_BODY_BYTES + b"}"
    _refused(client.post(f"/v1/jobs/{queued['id']}/cancel", content=big), 413, "payload_too_large")
    assert client.get(f"/v1/jobs/{queued['id']}").json()["state"] == "queued"
    r = client.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
    assert str(MAX_BODY_BYTES) in _refused(r, 413, "payload_too_large")["detail"]

    # Streamed without Content-Length (chunked): counted as it is read.
    def chunks() -> Iterator[bytes]:
        yield b'{"source": "'
        for _ in range(MAX_BODY_BYTES // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    r = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    _refused(r, 413, "payload_too_large")
    # At the limit, a body is read and parsed as usual.
    start = b'{"to": "native"'
    padded = start + b" " * (MAX_BODY_BYTES - len(start) - 1) + b"}"
    assert len(padded) == MAX_BODY_BYTES
    r = client.post("/v1/jobs", content=padded, headers={"Content-Type": "application/json"})
    assert _invalid_fields(r) == {"source", "target"}
    assert client.get("/healthz").status_code == 200


def test_every_operation_with_a_body_declares_its_refusals(api):
    spec = httpx.get(f"{api.url}/openapi.json").json()
    problem = {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    bodies = [op for path in spec["paths"].values() for op in path.values() if "requestBody" in op]
    assert len(bodies) >= 4
    for op in bodies:
        for status, code in {
            "400": "malformed_body",
            "413": "payload_too_large",
            "422": "invalid_request",
        }.items():
            assert op["responses"][status]["content"] == problem, (op["operationId"], status)
            assert f"`{code}`" in op["responses"][status]["description"], (op["operationId"], status)


def test_a_body_that_is_not_utf8_is_a_malformed_body(client):
    r = client.post("/v1/jobs", content=b'{"source": "\xff"}', headers={"Content-Type": "application/json"})
    _refused(r, 400, "malformed_body")


# ------------------------------------------------------------------------------------------ headers


def test_headers_over_the_limit_get_431(api, client):
    # Arriving at once, they reach the app whole; sent in pieces, the HTTP parser stops buffering first.
    r = client.get("/v1/jobs", headers={"X-Padding": "x" * MAX_HEAD_BYTES})
    assert "16384" in _refused(r, 431, "headers_too_large")["detail"]
    port = int(api.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n")
        for _ in range(4 * MAX_HEAD_BYTES // 1024):
            try:
                s.sendall(b"X-Padding: " + b"x" * 1010 + b"\r\n")
            except OSError:  # the server answered and closed mid-way
                break
            time.sleep(0.002)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer[:300]
    assert b"content-type: application/problem+json" in head.lower() and b'"headers_too_large"' in body
    # A header well within the limit is served, and the server is still there.
    assert client.get("/v1/jobs", headers={"X-Padding": "x" * (MAX_HEAD_BYTES // 2)}).status_code == 200
    huge = client.get("/v1/jobs", headers={"X-Padding": "x" * (1024 * 1024)})
    _refused(huge, 431, "headers_too_large")
    assert client.get("/healthz").status_code == 200


def test_idempotency_key_is_bounded(client, root):
    r = client.post("/v1/jobs", json=_job(root), headers={"Idempotency-Key": "k" * 201})
    assert _invalid_fields(r) == {"header.idempotency-key"}


# ------------------------------------------------------------------------------------------- labels


def test_labels_up_to_the_limits_are_accepted(client, root):
    labels = {f"k{i:02d}-" + "k" * 59: "v" * MAX_LABEL_VALUE for i in range(MAX_LABELS)}
    assert all(len(k) == 63 for k in labels)
    job = submit(client, _job(root, labels=labels))
    assert job["labels"] == labels
    listed = client.get("/v1/jobs", params={"label": f"k00-{'k' * 59}={'v' * MAX_LABEL_VALUE}"}).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    spaced = submit(client, _job(root, labels={"team": "Model conversion / EU, nightly (v2)"}))
    assert spaced["labels"] == {"team": "Model conversion / EU, nightly (v2)"}


def test_labels_over_the_limits_are_refused_naming_the_field(client, root):
    def fields(labels: dict[str, str]) -> set[str]:
        return _invalid_fields(client.post("/v1/jobs", json=_job(root, labels=labels)))

    assert fields({f"k{i}": "v" for i in range(MAX_LABELS + 1)}) == {"labels"}
    assert fields({"k" * 64: "v"}) == {f"labels.{'k' * 64}.[key]"}
    assert fields({"-leading": "v", "white space": "v", "": "v"}) == {
        "labels.-leading.[key]", "labels.white space.[key]", "labels..[key]"}  # fmt: skip
    assert fields({"team": "v" * (MAX_LABEL_VALUE + 1)}) == {"labels.team"}
    assert fields({"team": ""}) == {"labels.team"}
    assert fields({"team": "line\nbreak"}) == {"labels.team"}
    problem = client.post("/v1/jobs", json=_job(root, labels={f"k{i}": "v" for i in range(40)})).json()
    assert f"at most {MAX_LABELS}" in problem["detail"]


def test_a_schedule_template_leaves_room_for_the_schedule_label(client, root):
    template = {"source": f"file://{root}/ckpts", "target": f"file://{root}/sched/{{name}}", "to": "native"}
    body = {"name": "labels", "cron": "0 0 1 1 *", "paused": True}
    full = {f"k{i}": "v" for i in range(MAX_LABELS)}
    r = client.post("/v1/schedules", json={**body, "template": {**template, "labels": full}})
    assert _invalid_fields(r) == {"template.labels"}
    full.pop("k0")
    made = client.post("/v1/schedules", json={**body, "template": {**template, "labels": full}})
    assert made.status_code == 201, made.text
    firing = client.post(f"/v1/schedules/{made.json()['id']}/run").json()
    assert firing["job_id"] and firing["error"] is None, firing
    job = client.get(f"/v1/jobs/{firing['job_id']}").json()
    assert len(job["labels"]) == MAX_LABELS and job["labels"]["schedule"] == made.json()["id"]


# ------------------------------------------------------------------------------------------ strings


def test_every_string_in_a_body_is_bounded(client, root):
    long_path = f"file://{root}/" + "p" * MAX_LOCATION
    for field, value in (("source", long_path), ("target", long_path), ("adapter", "a" * (MAX_NAME + 1)),
                         ("source_credential", "c" * (MAX_NAME + 1)), ("target_credential", "c" * (MAX_NAME + 1)),
                         ("commit_message", "m" * (MAX_COMMIT_MESSAGE + 1))):  # fmt: skip
        assert _invalid_fields(client.post("/v1/jobs", json=_job(root, **{field: value}))) == {field}
    r = client.post("/v1/inspect", json={"source": long_path})
    assert _invalid_fields(r) == {"source"}
    template = {"source": f"file://{root}/ckpts", "target": f"file://{root}/sched/{{name}}", "to": "native"}
    schedule = {"name": "bounded", "cron": "0 0 1 1 *", "template": template}
    for field, changed in (
        ("name", {"name": "n" * (MAX_NAME + 1)}),
        ("cron", {"cron": "0 " * MAX_CRON}),
        ("template.source_pattern", {"template": {**template, "source_pattern": "s" * (MAX_PATTERN + 1)}}),
        ("template.target", {"template": {**template, "target": long_path + "/{name}"}}),
    ):
        assert _invalid_fields(client.post("/v1/schedules", json={**schedule, **changed})) == {field}
    r = client.get("/v1/jobs", params={"cursor": "c" * 65, "label": "k=" + "v" * 400})
    assert _invalid_fields(r) == {"query.cursor", "query.label"}
