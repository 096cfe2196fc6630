"""The tree stays ruff-clean; CI runs this with the rest of the suite."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff") or f"{sys.executable} -m ruff"
    proc = subprocess.run([*ruff.split(), "check", str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
