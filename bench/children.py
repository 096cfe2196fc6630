"""Running a measured step in a fresh child process, shared by the benchmarks.

Each step runs in its own process so its peak RSS (``ru_maxrss`` from ``os.wait4``) is its own; the
benchmark parents import neither torch nor numpy, because on Linux a vfork'ed child starts from its
parent's RSS high-water mark.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


class StepFailed(RuntimeError):
    """A measured step exited non-zero or produced a wrong result."""


def measure(
    argv: list[str], label: str, logs: Path, env: dict[str, str] | None = None
) -> tuple[str, float, int]:
    """Run ``argv`` in a fresh child; return (stdout, wall seconds, peak RSS bytes of the child)."""
    out_path, err_path = logs / f"{label}.out", logs / f"{label}.err"
    started = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    stdout = out_path.read_text()
    if proc.returncode != 0:
        tail = err_path.read_text()[-3000:] or stdout[-3000:]
        raise StepFailed(f"{label} exited with {proc.returncode}:\n{tail}")
    return stdout, wall, usage.ru_maxrss * 1024  # Linux reports KiB
