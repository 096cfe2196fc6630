"""``recast up``: the whole service on one machine: an embedded Redis (unless RECAST_REDIS_URL is set),
one worker, the schedule beat and the API on localhost. Ctrl-C stops them all, the worker first
finishing its task."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import uvicorn

from service.embedded import EmbeddedRedis

WORKER_GRACE_S = 30


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "recast"


def up(port: int, host: str = "127.0.0.1", file_roots: list[str] | None = None) -> int:
    embedded = None
    if not os.environ.get("RECAST_REDIS_URL"):
        embedded = EmbeddedRedis(data_dir() / "redis").start()
        os.environ["RECAST_REDIS_URL"] = embedded.url
    token = None
    if not os.environ.get("RECAST_API_TOKENS"):
        token = "dev-" + secrets.token_urlsafe(24)
        os.environ["RECAST_API_TOKENS"] = token
    if not os.environ.get("RECAST_FILE_ROOTS"):
        os.environ["RECAST_FILE_ROOTS"] = os.pathsep.join(file_roots or [os.getcwd()])
    children = [
        subprocess.Popen([sys.executable, "-m", "worker.cli", role, "--loglevel", "WARNING"])
        for role in ("worker", "beat")
    ]
    try:
        from service.app import create_app

        app = create_app()
        url = f"http://{host}:{port}"
        print(f"Recast is up at {url}  (API docs {url}/docs)", flush=True)
        print(f"  redis   {'embedded, ' + embedded.url if embedded else 'RECAST_REDIS_URL'}", flush=True)
        print(f"  files   {os.environ['RECAST_FILE_ROOTS']}", flush=True)
        if token:
            print(f"  token   {token}   (development token; set RECAST_API_TOKENS to choose your own)", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(WORKER_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if embedded is not None:
            embedded.stop()
        print("Recast stopped.", flush=True)
    return 0
