"""`recast up` on a machine with nothing configured: embedded Redis, one worker, the API; Ctrl-C stops all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil
from harness import ROOT, free_port, wait


def test_recast_up_runs_a_job_and_stops_cleanly(checkpoint, tmp_path):
    src = checkpoint("mistral4")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECAST_")}
    env |= {"XDG_DATA_HOME": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "up", "--port", str(port), "--file-root", str(src.parent),
         "--file-root", str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        banner = ""
        while "Ctrl-C" not in banner:
            line = proc.stdout.readline()
            assert line, f"recast up exited early: {banner}"
            banner += line
        assert f"http://127.0.0.1:{port}" in banner
        token = re.search(r"token\s+(dev-\S+)", banner).group(1)
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
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert "Recast stopped." in proc.stdout.read()
        _gone, alive = psutil.wait_procs(family, timeout=20)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
