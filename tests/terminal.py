"""Running ``recast`` in a pseudo-terminal, as a person at a terminal would: what it draws there."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_terminal(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[int, str]:
    """Run ``recast ARGS`` with stdin, stdout and stderr on a pseudo-terminal; its exit code and everything
    it wrote there, terminal escapes removed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", *args], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
        env={**os.environ, "COLUMNS": "160", "TERM": "xterm", **(env or {})},
    )  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    code = proc.wait(timeout)
    return code, _ESCAPES.sub("", b"".join(chunks).decode(errors="replace"))
