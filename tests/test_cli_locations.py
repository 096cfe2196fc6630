"""``recast convert``, ``verify`` and ``inspect`` on the service's locations: the Hub (a loopback Hub
server) straight to S3 (moto's server) and back, with the service's settings and credentials."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from servers import HubServer

from worker.cli import main
from worker.engine import api
from worker.engine.checkpoint import MANIFEST, SIDECAR

RUN_SPECIFIC = {SIDECAR, MANIFEST}


@pytest.fixture
def stores(s3_server: str, hub_server: HubServer, monkeypatch, tmp_path: Path) -> boto3.client:
    """The environment a laptop would have: the stores' endpoints, and a credentials file naming one."""
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({"hub-bot": {"type": "hf", "token": "hf_cli_0123456789"}}))
    monkeypatch.setenv("RECAST_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("RECAST_HF_ENDPOINT", hub_server.endpoint)
    monkeypatch.setenv("RECAST_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("RECAST_SCRATCH_DIR", str(tmp_path / "scratch"))
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="cli-out")
    return client


def _s3_files(client, bucket: str, prefix: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/").get("Contents", [])
    return {
        o["Key"][len(prefix) + 1 :]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in listed
    }


def _local_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _same(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    """The same files, byte for byte, but for those that record where and when the conversion ran."""
    assert sorted(set(got) - RUN_SPECIFIC) == sorted(set(want) - RUN_SPECIFIC)
    assert [n for n in want if n not in RUN_SPECIFIC and got[n] != want[n]] == []


def test_hub_to_s3_and_back(stores, hub_server: HubServer, checkpoint, tmp_path: Path, capsys) -> None:
    src = checkpoint("deepseek-v3", scheme="block")
    sha = hub_server.add_repo("vendor/model-fp8", src)
    local = tmp_path / "local-native"
    api.convert(src, local, api.Options(to="native", device="cpu"))

    args = ["hf://vendor/model-fp8", "s3://cli-out/native/v1"]
    assert main(["convert", *args, "--to", "native", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "published s3://cli-out/native/v1" in out
    written = _s3_files(stores, "cli-out", "native/v1")
    assert set(written) == set(_local_files(local))
    _same(written, _local_files(local))
    recorded = json.loads(written[SIDECAR])["source"]
    assert recorded["location"] == "hf://vendor/model-fp8" and recorded["revision"] == sha
    assert not list((tmp_path / "scratch").iterdir()), "scratch is cleaned up"

    assert main(["verify", *args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["passed"]
    assert main(["inspect", "s3://cli-out/native/v1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "native"

    assert main(["convert", *args, "--to", "native", "--device", "cpu"]) == 2
    assert "s3://cli-out/native/v1 already holds files; pass --overwrite" in capsys.readouterr().err

    back = tmp_path / "back"
    assert main(["convert", "s3://cli-out/native/v1", f"file://{back}", "--to", "hf", "--device", "cpu"]) == 0
    _same(_local_files(back), _local_files(src))


def test_local_to_the_hub_with_a_named_credential(
    stores, hub_server: HubServer, checkpoint, tmp_path: Path, capsys
) -> None:
    src = checkpoint("mistral4", scheme="per-tensor")
    hub_server.add_repo("team/model-native", token="hf_cli_0123456789")
    target = "hf://team/model-native"
    assert main(["convert", str(src), target, "--to", "native", "--device", "cpu"]) == 2
    assert "team/model-native" in capsys.readouterr().err, "refused without the token"
    head = hub_server.repos["team/model-native"].refs["main"]
    commit = "/api/models/team/model-native/commit/main"
    hub_server.faults[commit] = 403
    try:
        code = main(["convert", str(src), target, "--to", "native", "--device", "cpu",
                     "--target-credential", "hub-bot"])  # fmt: skip
    finally:
        del hub_server.faults[commit]
    err = capsys.readouterr().err
    assert code == 2 and "team/model-native" in err and "hf_cli_0123456789" not in err
    assert hub_server.repos["team/model-native"].refs["main"] == head, "nothing was published"
    assert not list((tmp_path / "scratch").iterdir()), "scratch is cleaned up"
    code = main(["convert", str(src), target, "--to", "native", "--device", "cpu",
                 "--target-credential", "hub-bot", "--commit-message", "native for training"])  # fmt: skip
    assert code == 0
    out, err = capsys.readouterr()
    assert "published hf://team/model-native@" in out
    assert "|" not in err, "huggingface_hub's own upload bars stay off: the CLI shows its own"
    files = hub_server.files("team/model-native")
    assert {SIDECAR, MANIFEST, "model.safetensors.index.json"} <= set(files)
    card = files["README.md"].decode()
    assert card.startswith("---\n") and f"Converted by Recast from `{src.as_uri()}`, and verified" in card
    assert "| adapter | `mistral4` |" in card and files[MANIFEST].decode().rstrip("\n") in card
    assert "hf_cli_0123456789" not in files[SIDECAR].decode()
    assert main(["verify", str(src), target, "--target-credential", "hub-bot"]) == 0
    assert "PASSED" in capsys.readouterr().out


@pytest.mark.parametrize(
    "src,dst,message",
    [
        ("s3://Not_A_Bucket/x", "./out", "SRC: s3://Not_A_Bucket/x: 'Not_A_Bucket' is not a valid S3 bucket"),
        ("./in", "ftp://host/x", "DST: ftp:// is not a supported location; use a local path"),
        (
            "hf://only-one-part",
            "./out",
            "SRC: hf://only-one-part: 'only-one-part' is not a Hub model repo id",
        ),
        ("s3://user:secret@bucket/x", "./out", "SRC: s3://***@bucket/x: credentials are not accepted"),
        ("./missing", "./out", "missing: not a directory"),
    ],
)
def test_bad_locations_name_the_argument(src, dst, message, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["convert", src, dst, "--to", "native"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "secret" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_plain_paths_stay_local_even_with_a_colon(checkpoint, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    src = checkpoint("mistral4", scheme="per-tensor")
    assert main(["convert", str(src), "out:1", "--to", "native", "--device", "cpu", "--json"]) == 0
    assert (tmp_path / "out:1" / SIDECAR).is_file()
    assert main(["verify", str(src), "out:1", "--json"]) == 0
