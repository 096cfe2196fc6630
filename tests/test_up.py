"""`recast up` on a machine with nothing configured: embedded Redis, one worker, the API; Ctrl-C stops all.
Its data (jobs, the development token) is per project and survives a restart; a port in use is one line."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from harness import ROOT, free_port, wait

from worker.sample import write_sample


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECAST_") and k != "XDG_DATA_HOME"}
    return env | {"HOME": str(home), "PYTHONPATH": str(ROOT)}


def _start(cwd: Path, env: dict[str, str], port: int, *args: str) -> tuple[subprocess.Popen[str], str]:
    """`recast up` in ``cwd``; returns the process and its banner, read up to "Ctrl-C"."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "up", "--port", str(port), *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    banner = ""
    while "Ctrl-C" not in banner:
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise AssertionError(f"recast up exited early: {banner}")
        banner += line
    return proc, banner


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    return proc.stdout.read()


def _token(banner: str) -> str:
    return re.search(r"token\s+(dev-\S+)", banner).group(1)


def test_recast_up_runs_a_job_and_stops_cleanly(checkpoint, tmp_path):
    src = checkpoint("mistral4")
    port = free_port()
    proc, banner = _start(ROOT, _env(tmp_path / "home"), port, "--file-root", str(src.parent),
                          "--file-root", str(tmp_path))  # fmt: skip
    try:
        assert f"http://127.0.0.1:{port}" in banner
        token = _token(banner)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert any("redis-server" in " ".join(p.cmdline()) for p in family)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as c:
            deadline = time.monotonic() + 90
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "no worker became ready"
                time.sleep(0.5)
            r = c.post(
                "/v1/jobs",
                json={"source": f"file://{src}", "target": f"file://{tmp_path}/out", "to": "native"},
            )
            assert r.status_code == 202, r.text
            assert wait(c, r.json()["id"])["state"] == "succeeded"
        assert (tmp_path / "out" / "model.safetensors.index.json").exists()
        family = psutil.Process(proc.pid).children(recursive=True)
        rest = _stop(proc)
        assert "Recast stopped." in rest
        # No start-up banners and no warnings from the worker or the beat (Celery's root SecurityWarning).
        assert "Warning" not in banner + rest and "celery beat" not in banner + rest, banner + rest
        _gone, alive = psutil.wait_procs(family, timeout=20)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_token_and_jobs_survive_a_restart_and_stay_in_their_project(tmp_path):
    home, one, two = tmp_path / "home", tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    env = _env(home)
    sample = Path(write_sample(one / "sample")["path"])
    port = free_port()
    proc, banner = _start(one, env, port)
    try:
        token = _token(banner)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}
        ) as c:
            body = {"source": f"file://{sample}", "target": f"file://{one}/out", "to": "native"}
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            job = r.json()["id"]
        _stop(proc)
        (token_file,) = (home / ".local/share/recast/projects").glob("one-*/dev-token")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        cli = subprocess.run([sys.executable, "-m", "worker.cli", "token"], cwd=one, env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        assert cli.stdout.strip() == token

        proc, banner = _start(one, env, port)  # the same project again: the same token, its jobs
        assert _token(banner) == token
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}
        ) as c:
            assert c.get(f"/v1/jobs/{job}").status_code == 200
        _stop(proc)

        proc, banner = _start(two, env, port)  # another project: its own token, none of the first one's jobs
        other = _token(banner)
        assert other != token
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {other}"}
        ) as c:
            assert c.get("/v1/jobs").json()["jobs"] == []
        _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_token_file_others_can_read_is_refused(tmp_path):
    data = tmp_path / "data"
    env = _env(tmp_path / "home")
    made = subprocess.run([sys.executable, "-m", "worker.cli", "token", "--data-dir", str(data)], env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert made.stdout.startswith("dev-")
    (data / "dev-token").chmod(0o644)
    refused = subprocess.run([sys.executable, "-m", "worker.cli", "token", "--data-dir", str(data)], env=env,
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "chmod 600" in refused.stderr and not refused.stdout


def test_a_port_in_use_is_one_line_and_nothing_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "worker.cli", "up", "--port", str(port), "--data-dir", str(tmp_path / "data")],
            env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "", "nothing may claim to be up"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "in use" in lines[0], proc.stderr
    assert not (tmp_path / "data").exists(), "no Redis (nor anything else) was started"
