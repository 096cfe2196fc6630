"""Running a measured step in a fresh child process, shared by the benchmarks.

Each step runs in its own process so its peak RSS (``ru_maxrss`` from ``os.wait4``) is its own; the
benchmark parents import neither torch nor numpy, because on Linux a vfork'ed child starts from its
parent's RSS high-water mark.
"""

from __future__ import annotations

import os
import subprocess
import sys
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


def recast_cmd() -> list[str]:
    """The ``recast`` CLI of this interpreter's environment, or ``python -m worker.cli``."""
    script = Path(sys.executable).parent / "recast"
    return [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli"]


def safetensors_sizes(d: Path) -> list[int]:
    """Sizes of the ``.safetensors`` files in ``d``, largest first."""
    return sorted((p.stat().st_size for p in d.glob("*.safetensors")), reverse=True)


def same_files(a: Path, b: Path, piece: int = 64 << 20) -> dict:
    """Whether directory ``b`` holds the same ``.safetensors`` files as ``a``, byte for byte."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    other = sorted(p.name for p in b.glob("*.safetensors"))
    if names != other:
        return {"identical": False, "detail": f"shard names differ: {names[:3]}… vs {other[:3]}…"}
    differ = []
    for name in names:
        with open(a / name, "rb") as fa, open(b / name, "rb") as fb:
            while True:
                x, y = fa.read(piece), fb.read(piece)
                if x != y:
                    differ.append(name)
                    break
                if not x:
                    break
    return {"identical": not differ, "files": len(names), "detail": f"differ: {differ}" if differ else ""}
