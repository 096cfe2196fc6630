"""A whole Recast service for tests: its own embedded Redis, the API under uvicorn on a loopback port,
and real Celery worker processes started with ``recast worker``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import uvicorn
from fastapi import FastAPI

from core.embedded import EmbeddedRedis

TOKEN = "test-token-0123456789"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir = workdir
        self.redis = EmbeddedRedis(workdir / "redis").start()
        self.env = {
            **os.environ,
            "RECAST_REDIS_URL": self.redis.url,
            "RECAST_API_TOKENS": f"other-token,{TOKEN}",
            "RECAST_FILE_ROOTS": str(workdir),
            "RECAST_SCRATCH_DIR": str(workdir / "scratch"),
            "RECAST_SHARD_TIME_LIMIT_S": "300",
            "PYTHONPATH": str(ROOT),
            **env,
        }
        self.workers: list[subprocess.Popen[bytes]] = []
        self._server: uvicorn.Server | None = None
        self.app: FastAPI | None = None
        self.url = ""

    def start(self, workers: int) -> Service:
        for _ in range(workers):
            self.add_worker()
        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            from service.app import SERVER_OPTIONS, create_app

            app = self.app = create_app()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        port = free_port()
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **SERVER_OPTIONS)
        )
        threading.Thread(target=self._server.run, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"
        self.wait_ready(workers)
        return self

    def add_worker(self) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"worker-{len(self.workers)}.log", "wb")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--loglevel", "INFO"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        self.workers.append(proc)
        return proc

    def wait_ready(self, workers: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                checks = httpx.get(self.url + "/readyz", timeout=5).json()["checks"]
                if checks["redis"] == "ok" and checks["workers"] >= workers:  # workers=0: not ready, but up
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"service not ready: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-3000:] for p in sorted(self.workdir.glob("worker-*.log"))
        )

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def pool_children(self, worker: subprocess.Popen[bytes]) -> list[psutil.Process]:
        return psutil.Process(worker.pid).children(recursive=True)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.wait(20)
            except subprocess.TimeoutExpired:
                w.kill()
        self.redis.stop()


def submit(client: httpx.Client, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    r = client.post("/v1/jobs", json=body, headers=headers)
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == f"/v1/jobs/{r.json()['id']}"
    return r.json()


def events(
    client: httpx.Client, job_id: str, last_event_id: str | None = None, timeout: float = 300
) -> Iterator[tuple[str, str, dict]]:
    """(id, type, job) of every server-sent event until the stream ends; ``timeout`` bounds each wait for
    bytes, so a stream that neither sends nor ends fails the caller."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        event: dict[str, str] = {}
        for line in r.iter_lines():
            if line.startswith(":"):
                continue
            if not line:
                if event:
                    yield event["id"], event["event"], json.loads(event["data"])
                event = {}
                continue
            k, _, v = line.partition(": ")
            event[k] = v


def wait(client: httpx.Client, job_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")
