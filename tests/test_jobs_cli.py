"""``recast jobs`` and ``recast.client`` against the real service: the API under uvicorn, real Redis and a
real Celery worker process (tests/harness.py)."""

from __future__ import annotations

import contextlib
import filecmp
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import TOKEN, Service, free_port
from terminal import run_in_terminal

from recast.client import ApiError, Client
from worker.cli import main
from worker.engine import api
from worker.engine.checkpoint import MANIFEST, SIDECAR


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    roots = tmp_path_factory.getbasetemp()
    svc = Service(tmp_path_factory.mktemp("svc"), {"RECAST_FILE_ROOTS": str(roots)})
    try:
        yield svc.start(workers=1)
    finally:
        svc.stop()


@pytest.fixture
def connected(service: Service, monkeypatch: pytest.MonkeyPatch) -> Service:
    monkeypatch.setenv("RECAST_URL", service.url)
    monkeypatch.setenv("RECAST_TOKEN", TOKEN)
    return service


def _out_lines(capsys) -> tuple[list[str], str]:
    out, err = capsys.readouterr()
    return out.splitlines(), err


def test_submit_wait_list_get_report(connected, checkpoint, tmp_path: Path, capsys) -> None:
    src = checkpoint("mistral4", scheme="per-tensor")
    dst = tmp_path / "native"
    code = main(["jobs", "submit", str(src), str(dst), "--to", "native", "--label", "ci=cli-test", "--wait"])
    out, err = _out_lines(capsys)
    assert code == 0, (out, err, connected.logs())
    job_id = out[-1].split()[0]
    assert out[-1] == f"{job_id} succeeded: {dst.as_uri()}"
    assert f"recast: job {job_id} running" in err and f"recast: job {job_id} succeeded" in err
    assert "3/3 shards" in err, "one line per finished shard"
    want = tmp_path / "cli"
    api.convert(src, want, api.Options(to="native", device="cpu"))
    for p in want.iterdir():
        if p.name not in (SIDECAR, MANIFEST):
            assert filecmp.cmp(dst / p.name, p, shallow=False), p.name

    assert main(["jobs", "list", "--label", "ci=cli-test", "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert [j["id"] for j in page["jobs"]] == [job_id] and page["jobs"][0]["labels"] == {"ci": "cli-test"}
    assert main(["jobs", "list", "--state", "succeeded"]) == 0
    table, _ = _out_lines(capsys)
    assert table[0].startswith("ID") and any(line.startswith(job_id) and " 3/3 " in line for line in table)
    code = main(
        ["jobs", "submit", str(src), str(tmp_path / "second"), "--to", "native", "--label", "ci=cli-test"]
    )
    second = capsys.readouterr().out.split()[0]
    assert code == 0 and main(["jobs", "list", "--label", "ci=cli-test", "--limit", "1"]) == 0
    table, _ = _out_lines(capsys)
    assert table[1].startswith(second) and table[-1].startswith("more: --cursor ")
    assert main(["jobs", "list", "--label", "ci=cli-test", "--limit", "1", *table[-1].split()[1:]]) == 0
    table, _ = _out_lines(capsys)
    assert table[1].startswith(job_id)
    assert main(["jobs", "get", job_id]) == 0
    shown, _ = _out_lines(capsys)
    assert shown[0] == f"{job_id}  succeeded  (done)" and "to native, adapter mistral4" in shown[1]
    assert main(["jobs", "report", job_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["passed"]
    assert main(["jobs", "report", job_id]) == 0
    assert "hf->native with mistral4: PASSED" in capsys.readouterr().out
    assert main(["jobs", "watch", job_id]) == 0, "a finished job: its outcome at once"
    assert capsys.readouterr().out.strip() == f"{job_id} succeeded: {dst.as_uri()}"


def test_watch_draws_a_bar_at_a_terminal(connected, checkpoint, tmp_path: Path) -> None:
    src = checkpoint("mistral4", scheme="per-tensor")
    code, screen = run_in_terminal(["jobs", "submit", str(src), str(tmp_path / "n"), "--to", "native", "--wait"],
                                   {"RECAST_URL": connected.url, "RECAST_TOKEN": TOKEN})  # fmt: skip
    assert code == 0 and "succeeded 3/3 shards (done)" in screen and "KiB" in screen, screen
    assert (
        f"succeeded: {(tmp_path / 'n').as_uri()}" in screen
        and "recast: job" not in screen.split("queued")[-1]
    )


def test_a_failed_job_exits_non_zero(connected, checkpoint, tmp_path: Path, capsys) -> None:
    src = checkpoint("mistral4", scheme="per-tensor")
    code = main(["jobs", "submit", str(src), str(tmp_path / "out"), "--to", "native",
                 "--adapter", "deepseek-v3", "--wait", "--json"])  # fmt: skip
    job = json.loads(capsys.readouterr().out)
    assert code == 1 and job["state"] == "failed" and job["error"]["code"] == "adapter_mismatch"
    assert main(["jobs", "watch", job["id"]]) == 1
    assert capsys.readouterr().out.startswith(f"{job['id']} failed: adapter_mismatch: ")
    assert main(["jobs", "report", job["id"]]) == 2
    assert "(report_not_ready)" in capsys.readouterr().err


def test_refusals_are_one_line_with_the_code(connected, checkpoint, tmp_path: Path, monkeypatch, capsys):
    src = checkpoint("mistral4", scheme="per-tensor")
    assert main(["jobs", "submit", str(src), str(src), "--to", "native"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("recast: ") and "(target_not_empty)" in err
    assert main(["jobs", "get", "no-such-job"]) == 2
    assert "(job_not_found)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["jobs", "submit", str(src), str(tmp_path / "o"), "--to", "native", "--label", "x"])
    assert exited.value.code == 2 and "argument --label: use KEY=VALUE, not 'x'" in capsys.readouterr().err
    monkeypatch.setenv("RECAST_TOKEN", "wrong-token")
    assert main(["jobs", "list"]) == 2
    err = capsys.readouterr().err
    assert "(unauthorized)" in err and "wrong-token" not in err
    assert main(["jobs", "--url", f"http://127.0.0.1:{free_port()}", "list"]) == 2
    assert "cannot reach the Recast service" in capsys.readouterr().err


def test_python_client_follows_events_and_resumes(connected, checkpoint, tmp_path: Path) -> None:
    src = checkpoint("deepseek-v3", scheme="block")
    with Client(connected.url, TOKEN) as client:
        job = client.submit(f"file://{src}", f"file://{tmp_path}/n", "native", labels={"via": "client"},
                            idempotency_key="client-test-1")  # fmt: skip
        assert client.submit(f"file://{src}", f"file://{tmp_path}/n", "native", labels={"via": "client"},
                             idempotency_key="client-test-1")["id"] == job["id"]  # fmt: skip
        seen = []
        done = client.wait(job["id"], seen.append)
        assert done["state"] == "succeeded" and done["result"]["url"] == (tmp_path / "n").as_uri()
        states = [e.job["state"] for e in seen if e.type == "state"]
        assert states[0] in ("queued", "running") and states[-3:] == ["verifying", "uploading", "succeeded"]
        progress = [e.job["progress"]["bytes_in"] for e in seen if e.type == "progress"]
        assert progress == sorted(progress) and progress[-1] <= done["progress"]["bytes_total"]
        assert done["progress"]["bytes_in"] == done["progress"]["bytes_total"] > 0
        middle = len(seen) // 2
        resumed = list(client.events(job["id"], last_event_id=seen[middle].id))
        assert [e.id for e in resumed] == [e.id for e in seen[middle + 1 :]]
        assert client.report(job["id"])["summary"]["passed"]
        with pytest.raises(ApiError) as info:
            client.cancel(job["id"])
        assert info.value.status == 409 and info.value.code == "not_cancellable"
        with pytest.raises(ApiError, match="is not a job id"):
            client.get("../admin")


def test_cancel_a_queued_job(checkpoint, tmp_path_factory, monkeypatch, capsys) -> None:
    """With no worker running, a job stays queued: cancelled at once, and watching it exits 1."""
    roots = tmp_path_factory.getbasetemp()
    idle = Service(tmp_path_factory.mktemp("idle"), {"RECAST_FILE_ROOTS": str(roots)})
    try:
        idle.start(workers=0)
        monkeypatch.setenv("RECAST_URL", idle.url)
        monkeypatch.setenv("RECAST_TOKEN", TOKEN)
        src = checkpoint("mistral4", scheme="per-tensor")
        out = tmp_path_factory.mktemp("cancel") / "out"
        assert main(["jobs", "submit", str(src), str(out), "--to", "native"]) == 0
        job_id, state = capsys.readouterr().out.split()
        assert state == "queued"
        assert main(["jobs", "cancel", job_id]) == 0
        assert capsys.readouterr().out.strip() == f"{job_id} cancelled"
        assert main(["jobs", "watch", job_id, "--json"]) == 1
        assert json.loads(capsys.readouterr().out)["state"] == "cancelled"
    finally:
        idle.stop()


class CuttingProxy:
    """A loopback TCP proxy to the service that cuts its first connection after ``cut`` bytes of the
    answer: a network dropping an event stream halfway."""

    def __init__(self, upstream: str, cut: int):
        self.upstream = httpx.URL(upstream)
        self.cut = cut
        self.cuts = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.upstream.host, self.upstream.port))
            limit = self.cut if self.cuts == 0 else None
            self.cuts += 1
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, limit), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while limit is None or sent < limit:
                data = src.recv(65536 if limit is None else min(65536, limit - sent))
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()


def test_client_resumes_a_dropped_event_stream(connected, checkpoint, tmp_path: Path) -> None:
    src = checkpoint("mistral4", scheme="per-tensor")
    with Client(connected.url, TOKEN) as direct:
        job_id = direct.submit(f"file://{src}", f"file://{tmp_path}/n", "native")["id"]
        direct.wait(job_id)
        want = [(e.id, e.job["state"]) for e in direct.events(job_id)]
        whole = len(direct._http.get(f"/v1/jobs/{job_id}/events").content)
    proxy = CuttingProxy(connected.url, cut=whole // 2)
    try:
        with Client(proxy.url, TOKEN) as client:
            got = [(e.id, e.job["state"]) for e in client.events(job_id)]
    finally:
        proxy.close()
    assert proxy.cuts == 2, "the first connection was cut and one more made"
    assert got == want and got[-1][1] == "succeeded", "every event once, in order"
