"""The Dockerfile and docker-compose.yml, checked offline (no Docker engine here): structure, the rules
that matter in production, and `docker compose config` where a compose binary is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SECRETISH = re.compile(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY)", re.I)


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_pinned_non_root_with_a_healthcheck():
    ins = _instructions()
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    froms = [a for w, a in ins if w == "FROM"]
    assert len(froms) >= 2 and any(" AS build" in f for f in froms), "multi-stage"
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+-[\w-]+", base), f"base image tag must be pinned: {base}"
    assert "latest" not in base
    assert args["VARIANT"] == "cuda" and args["TORCH_VERSION"] == "2.13.0"
    run = " ".join(a for w, a in ins if w == "RUN")
    assert "download.pytorch.org/whl/cpu" in run, "the cpu variant installs the CPU build of torch"
    users = [a for w, a in ins if w == "USER"]
    assert users and not users[-1].startswith(("0", "root")), "runs as a non-root user"
    assert any(w == "HEALTHCHECK" and "/healthz" in a for w, a in ins)
    assert [a for w, a in ins if w == "ENTRYPOINT"] == ['["recast"]']
    for w, a in ins:
        if w in ("ENV", "ARG"):
            assert not SECRETISH.search(a), f"no secret may be baked into the image: {w} {a}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "recast.env", ".whl"} <= set(ignored)


def test_the_image_holds_every_package():
    """``pip install /src`` builds only what was copied in: a package left out fails at import in the image."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {p.rstrip("*") for p in setuptools["packages"]["find"]["include"]}
    copied = {a.split()[0] for w, a in _instructions() if w == "COPY" and not a.startswith("--")}
    assert packages <= copied, f"the Dockerfile copies no {sorted(packages - copied)}"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_and_production_rules(compose):
    s = compose["services"]
    assert {"api", "worker", "worker-cpu", "beat", "redis", "minio"} <= set(s)
    assert [s[r]["command"][0] for r in ("api", "worker", "worker-cpu", "beat")] == [
        "api",
        "worker",
        "worker",
        "beat",
    ]
    gpu = s["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"] and s["worker"]["profiles"] == ["gpu"]
    assert s["worker-cpu"]["profiles"] == ["cpu"] and s["worker-cpu"]["build"]["args"]["VARIANT"] == "cpu"
    redis_cmd = " ".join(s["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    assert "redis:/data" in s["redis"]["volumes"] and "redis" in compose["volumes"]
    assert s["redis"]["image"].count(":") == 1 and not s["redis"]["image"].endswith(":latest")
    assert s["api"]["environment"]["RECAST_REDIS_URL"] == "redis://redis:6379/0"
    for name, svc in s.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
        for key, value in (svc.get("environment") or {}).items():
            assert not SECRETISH.search(key), f"{name}: secrets belong in the env file, not {key}={value}"
    example = (ROOT / "recast.example.env").read_text()
    for line in example.splitlines():
        if (
            "=" in line
            and not line.startswith("#")
            and re.search("TOKEN|SECRET|PASSWORD", line.split("=")[0])
        ):
            assert "change-me" in line, f"the example env file must not carry a usable secret: {line}"


def _compose_cli() -> list[str] | None:
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_config_accepts_it():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose / docker-compose binary installed (.ci/run installs Debian's)")
    for profile in ("gpu", "cpu"):
        done = subprocess.run(
            [*cli, "--profile", profile, "config", "-q"], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
