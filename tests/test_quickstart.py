"""The README's quick start works as written: `recast up` in a new directory, `recast sample`, the curl
that submits the sample to the service, and the CLI conversion there and back, byte for byte. The blocks
are read from README.md itself (tests/readme_quickstart.py runs them), so the two cannot drift apart."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ROOT

from worker.engine.api import Options, convert
from worker.sample import FAMILIES, write_sample

DRIVER = ROOT / "tests" / "readme_quickstart.py"


def _namespace() -> list[str]:
    """A private network namespace (its own loopback, so port 8000 is free), where this machine allows one."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return []
    cmd = ["unshare", "--net", "--map-root-user"]
    probe = subprocess.run([*cmd, "ip", "link", "set", "lo", "up"], capture_output=True)
    return cmd if probe.returncode == 0 else []


def test_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    ns = _namespace()
    proc = subprocess.run(
        [*ns, sys.executable, str(DRIVER), str(tmp_path), *(["--lo-up"] if ns else [])],
        capture_output=True, text=True, timeout=580,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in got:
        pytest.skip(got["skip"])
    assert got["client_rc"] == 0, got["client_out"] + got["client_err"]
    assert "round trip: byte-identical" in got["client_out"]
    (job,) = got["jobs"]
    assert job["state"] == "succeeded", job
    assert job["request"]["source"].endswith("/recast-try/sample-fp8")
    assert (tmp_path / "shell/recast-try/sample-native/model.safetensors.index.json").exists()
    assert got["docs_assets"] and all(a.startswith("/") for a in got["docs_assets"]), got["docs_assets"]
    assert set(got["docs_assets"].values()) == {200}
    assert got["server_rc"] == 0 and "Recast stopped." in got["server_rest"]


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_converts_and_round_trips_byte_for_byte(family: str, tmp_path: Path) -> None:
    sample = tmp_path / "sample"
    write_sample(sample, family)
    report = convert(sample, tmp_path / "native", Options(to="native"))
    assert report.passed and report.adapter == family
    assert convert(tmp_path / "native", tmp_path / "back", Options(to="hf")).passed
    for f in sample.iterdir():
        assert (tmp_path / "back" / f.name).read_bytes() == f.read_bytes(), f.name


def test_sample_needs_no_transformers_and_refuses_a_used_directory(tmp_path: Path) -> None:
    blocked = "import sys; sys.modules['transformers'] = None; from worker.cli import main; sys.exit(main())"
    made = subprocess.run([sys.executable, "-c", blocked, "sample", str(tmp_path / "s"), "--family", "mistral4"],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "mistral4 sample FP8 checkpoint" in made.stdout
    again = subprocess.run([sys.executable, "-m", "worker.cli", "sample", str(tmp_path / "s")], cwd=ROOT,
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 2 and "not an empty directory" in again.stderr
