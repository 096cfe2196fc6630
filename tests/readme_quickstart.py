"""Runs the README's quick start as written: its ``server`` block (``recast up``) in the background, then
its ``client`` block, both from a fresh directory with a fresh HOME; then follows the job the client
submitted to its end, looks at /docs, and stops the server with Ctrl-C. Prints one JSON object.

Run as a script by tests/test_quickstart.py, in a private network namespace where it can have one, so
the README's port 8000 is free whatever else runs on the machine; with ``--lo-up`` it first brings up
that namespace's loopback. Each block runs with ``bash -e``, so a failing line fails the block.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
URL = "http://127.0.0.1:8000"
_BLOCK = re.compile(r"<!-- quickstart: (?P<name>\w+) -->\s*```sh\n(?P<body>.*?)```", re.S)


def quickstart_blocks(text: str | None = None) -> dict[str, str]:
    """The README's shell blocks marked ``<!-- quickstart: NAME -->``, by name."""
    return {m["name"]: m["body"] for m in _BLOCK.finditer(text if text is not None else README.read_text())}


def _environment(work: Path) -> dict[str, str]:
    """A fresh HOME, no RECAST_* settings, and ``recast`` meaning this checkout under this interpreter."""
    bin_dir = work / "bin"
    bin_dir.mkdir()
    (bin_dir / "recast").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m worker.cli "$@"\n')
    (bin_dir / "recast").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECAST_") and k != "XDG_DATA_HOME"}
    return env | {
        "HOME": str(work / "home"),
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "PYTHONPATH": str(ROOT),
    }


def run(work: Path) -> dict[str, object]:
    blocks = quickstart_blocks()
    env = _environment(work)
    shell = work / "shell"
    shell.mkdir()
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8000)) == 0:
            return {"skip": "port 8000 is in use here, and no private network namespace could be had"}
    server = subprocess.Popen(
        ["bash", "-e", "-c", blocks["server"]], cwd=shell, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    out: dict[str, object] = {}
    try:
        banner = ""
        while "Ctrl-C" not in banner:
            line = server.stdout.readline()
            if not line:
                raise RuntimeError(f"recast up exited early:\n{banner}")
            banner += line
        out["banner"] = banner
        client = subprocess.run(
            ["bash", "-e", "-c", blocks["client"]], cwd=shell, env=env, capture_output=True, text=True, timeout=400
        )  # fmt: skip
        out |= {"client_rc": client.returncode, "client_out": client.stdout, "client_err": client.stderr}
        token = subprocess.run(["recast", "token"], cwd=shell / "recast-try", env=env, capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
        with httpx.Client(base_url=URL, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            jobs = c.get("/v1/jobs").json()["jobs"]
            deadline = time.monotonic() + 240
            while jobs and jobs[0]["state"] not in ("succeeded", "failed", "cancelled"):
                if time.monotonic() > deadline:
                    break
                time.sleep(1)
                jobs = c.get("/v1/jobs").json()["jobs"]
            out["jobs"] = jobs
            docs = c.get("/docs").text
            assets = re.findall(r'(?:src|href)="([^"]+)"', docs)
            out["docs_assets"] = {a: c.get(a).status_code for a in assets}
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        out["server_rc"] = server.returncode
        out["server_rest"] = server.stdout.read()
    return out


if __name__ == "__main__":
    if "--lo-up" in sys.argv:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    print(json.dumps(run(Path(sys.argv[1]))))
