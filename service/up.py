"""``recast up``: the whole service on one machine: an embedded Redis (unless RECAST_REDIS_URL is set),
one worker, the schedule beat and the API on localhost. Ctrl-C stops them all, the worker first
finishing its task.

Everything it keeps (the embedded Redis's data, the development token) lives in a data directory of
its own per project, the directory it is started in, so a restart finds its jobs and its token again
and another project's jobs never show up. The port is bound before anything starts, so a port in use
is one clear line (exit 2), and "up" is printed only once the API is accepting requests.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import uvicorn

from core.embedded import EmbeddedRedis
from worker.engine.errors import RecastError

WORKER_GRACE_S = 30
TOKEN_FILE = "dev-token"


def project_data_dir(project: Path) -> Path:
    """``$XDG_DATA_HOME/recast/projects/<name>-<hash of the path>`` (``~/.local/share`` by default): one
    per project directory, outside it, so the file root ``recast up`` serves never holds its secrets."""
    where = project.resolve()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", where.name)[:40] or "root"
    digest = hashlib.sha256(str(where).encode()).hexdigest()[:12]
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "recast" / "projects" / f"{name}-{digest}"


def dev_token(data_dir: Path) -> str:
    """The development token kept in ``data_dir`` (mode 0600), made on first use: it must outlive a
    restart, since the jobs, the dashboard's cookie and the user's shell variable all outlive it."""
    path = data_dir / TOKEN_FILE
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".dev-token-")  # created 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write("dev-" + secrets.token_urlsafe(24) + "\n")
            with contextlib.suppress(FileExistsError):  # another `recast up` or `recast token` was first
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    if path.stat().st_mode & 0o077:
        raise RecastError(f"{path}: other users can read this token file; `chmod 600` it (or delete it to get "
                          "a new token)")  # fmt: skip
    token = path.read_text().strip()
    if not token:
        raise RecastError(f"{path}: the token file is empty; delete it to get a new token")
    return token


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, before anything else starts; a port in use is a RecastError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT from the last run is no conflict
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise RecastError(f"port {port} on {host} is already in use (another `recast up`?); "
                              "choose another with --port") from None  # fmt: skip
        raise RecastError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(False)
    return sock


class _Server(uvicorn.Server):
    """Says it is up once the API accepts requests, not before."""

    def __init__(self, config: uvicorn.Config, announce: list[str]):
        super().__init__(config)
        self.announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print("\n".join(self.announce), flush=True)


def up(
    port: int, host: str = "127.0.0.1", file_roots: list[str] | None = None, data_dir: Path | None = None
) -> int:
    """Run everything until Ctrl-C; returns the exit status. Bad input (a port in use) raises RecastError."""
    listener = bind(host, port)
    data = data_dir or project_data_dir(Path.cwd())
    embedded = None
    token = None
    if not os.environ.get("RECAST_API_TOKENS"):
        token = dev_token(data)
        os.environ["RECAST_API_TOKENS"] = token
    if not os.environ.get("RECAST_REDIS_URL"):
        embedded = EmbeddedRedis(data / "redis").start()
        os.environ["RECAST_REDIS_URL"] = embedded.url
    if not os.environ.get("RECAST_FILE_ROOTS"):
        os.environ["RECAST_FILE_ROOTS"] = os.pathsep.join(file_roots or [os.getcwd()])
    children = [
        subprocess.Popen([sys.executable, "-m", "worker.cli", role, "--loglevel", "WARNING", "--quiet"])
        for role in ("worker", "beat")
    ]
    try:
        from service.app import SERVER_OPTIONS, create_app

        url = f"http://{host}:{listener.getsockname()[1]}"  # the port bound: --port 0 picks a free one
        announce = [
            f"Recast is up at {url}  (API docs {url}/docs)",
            f"  redis   {'embedded, data in ' + str(data) if embedded else 'RECAST_REDIS_URL'}",
            f"  files   {os.environ['RECAST_FILE_ROOTS']}",
        ]
        if token:
            announce.append(f"  token   {token}   (development token from {data / TOKEN_FILE}; "
                            "`recast token` prints it)")  # fmt: skip
        announce.append("Ctrl-C stops everything.")
        server = _Server(uvicorn.Config(create_app(), log_level="warning", **SERVER_OPTIONS), announce)
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises Ctrl-C again once it has shut down
            server.run(sockets=[listener])
        started = server.started
    finally:
        listener.close()
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
    return 0 if started else 1  # not started: uvicorn logged why
