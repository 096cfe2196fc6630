"""Stores: location parsing, settings and credentials, and every source and target against real servers.

S3 is moto's server and the Hub is tests/servers.py's loopback Hub, both over TCP, so boto3 and
huggingface_hub run their real request code; nothing is patched inside them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import boto3
import botocore.loaders
import pytest
import torch
from botocore.exceptions import ClientError, EndpointConnectionError
from servers import HubServer, upload_directory

from worker.engine import api
from worker.engine.convert import plan_conversion
from worker.engine.errors import CheckpointError, RecastError, TargetExistsError
from worker.engine.shard_stream import ShardStream, Slot
from worker.engine.storage import Source
from worker.engine.tensors import _remote_pool
from worker.stores import (
    Location,
    Receipt,
    StoreSettings,
    Target,
    TransientStorageError,
    open_source,
    open_target,
    parse_location,
    pin_revision,
    staging,
)
from worker.stores import s3 as s3_store
from worker.stores.hub import HubSource, HubTarget
from worker.stores.local import FileTarget
from worker.stores.s3 import UPLOAD_THREADS, S3Source, S3Target, make_client, part_size, storage_error

MIB = 1 << 20
S3_SECRET = "s3-secret-value-do-not-print"
HF_TOKEN = "hf_token_value_do_not_print"
INDEX = "model.safetensors.index.json"


def _files(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


@pytest.fixture
def small_dir(tmp_path: Path) -> Path:
    return _files(
        tmp_path / "ckpt",
        {
            "config.json": b'{"architectures": ["X"]}\n',
            "model-00001-of-00002.safetensors": bytes(range(256)) * 40,
            "model-00002-of-00002.safetensors": os.urandom(3000),
            INDEX: b'{"weight_map": {}}\n',
            "sub/extra.txt": b"hello",
            ".hidden": b"not part of the checkpoint",
        },
    )


@pytest.fixture
def creds_file(tmp_path: Path, s3_server: str) -> Path:
    path = tmp_path / "credentials.json"
    path.write_text(
        json.dumps(
            {
                "minio": {
                    "type": "s3",
                    "aws_access_key_id": "testing",
                    "aws_secret_access_key": S3_SECRET,
                    "endpoint_url": s3_server,
                    "region": "us-east-1",
                },
                "hub": {"type": "hf", "token": HF_TOKEN},
                "wrong-hub": {"type": "hf", "token": HF_TOKEN + "-wrong"},
            }
        )
    )
    return path


def _bucket(endpoint: str) -> str:
    name = f"recast-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_settings(s3_server: str, tmp_path: Path) -> StoreSettings:
    return StoreSettings(
        s3_endpoint_url=s3_server,
        s3_region="us-east-1",
        s3_multipart_chunk_bytes=5 * MIB,
        scratch=tmp_path / "scratch",
    )


@pytest.fixture
def hub_settings(hub_server: HubServer, tmp_path: Path) -> StoreSettings:
    return StoreSettings(hf_endpoint=hub_server.endpoint, scratch=tmp_path / "scratch")


def _repo_id(prefix: str = "model") -> str:
    return f"org/{prefix}-{uuid.uuid4().hex[:10]}"


# -- settings and credentials ------------------------------------------------------------------------


def test_settings_from_env_reads_every_variable(tmp_path: Path) -> None:
    env = {
        "RECAST_FILE_ROOTS": f"/data/a{os.pathsep}/data/b,/data/c",
        "RECAST_SCRATCH_DIR": str(tmp_path),
        "RECAST_S3_ENDPOINT_URL": "http://minio:9000",
        "RECAST_S3_REGION": "eu-west-1",
        "RECAST_S3_ADDRESSING_STYLE": "path",
        "RECAST_S3_CHECKSUM": "when_required",
        "RECAST_S3_MULTIPART_CHUNK_MB": "128",
        "RECAST_S3_UPLOAD_CHECKSUM": "crc64nvme",
        "RECAST_HF_ENDPOINT": "http://hub.local/",
        "RECAST_HF_TIMEOUT_S": "2.5",
        "RECAST_CREDENTIALS_FILE": "/etc/recast/credentials.json",
    }
    s = StoreSettings.from_env(env)
    assert s.file_roots == (Path("/data/a"), Path("/data/b"), Path("/data/c"))
    assert s.scratch == tmp_path
    assert (s.s3_endpoint_url, s.s3_region, s.s3_addressing_style) == (
        "http://minio:9000",
        "eu-west-1",
        "path",
    )
    assert (s.s3_checksum, s.s3_multipart_chunk_bytes) == ("when_required", 128 * MIB)
    assert s.s3_upload_checksum == "crc64nvme"
    assert (s.hf_endpoint, s.hf_timeout_s) == ("http://hub.local", 2.5)
    assert s.credentials_file == Path("/etc/recast/credentials.json")
    assert StoreSettings.from_env({"RECAST_S3_REGION": " "}) == StoreSettings()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RECAST_S3_ADDRESSING_STYLE": "sideways"}, "RECAST_S3_ADDRESSING_STYLE"),
        ({"RECAST_S3_CHECKSUM": "always"}, "RECAST_S3_CHECKSUM"),
        ({"RECAST_S3_MULTIPART_CHUNK_MB": "4"}, "RECAST_S3_MULTIPART_CHUNK_MB"),
        ({"RECAST_S3_MULTIPART_CHUNK_MB": "lots"}, "RECAST_S3_MULTIPART_CHUNK_MB"),
        ({"RECAST_S3_UPLOAD_CHECKSUM": "md5"}, "RECAST_S3_UPLOAD_CHECKSUM"),
        ({"RECAST_HF_TIMEOUT_S": "0"}, "RECAST_HF_TIMEOUT_S"),
        ({"RECAST_HF_TIMEOUT_S": "soon"}, "RECAST_HF_TIMEOUT_S"),
        ({"RECAST_HF_ENDPOINT": "huggingface.co"}, "RECAST_HF_ENDPOINT"),
        ({"RECAST_FILE_ROOTS": "relative/dir"}, "RECAST_FILE_ROOTS"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(RecastError, match=expected):
        StoreSettings.from_env(env)


def test_credentials_by_name_never_show_secrets(creds_file: Path, tmp_path: Path) -> None:
    s = StoreSettings(credentials_file=creds_file)
    assert s.credential(None, "s3") == {}
    cred = s.credential("minio", "s3")
    assert cred["aws_secret_access_key"] == S3_SECRET and "type" not in cred
    assert (
        S3_SECRET not in repr(cred) and S3_SECRET not in str(cred) and "aws_secret_access_key" in repr(cred)
    )
    assert s.credential("hub", "hf") == {"token": HF_TOKEN}
    for name, kind, expected in [
        ("nope", "s3", "'nope' is not defined"),
        ("hub", "s3", "'hub' has type 'hf'"),
        ("minio", "hf", "'minio' has type 's3'"),
    ]:
        with pytest.raises(RecastError, match=expected) as info:
            s.credential(name, kind)
        assert S3_SECRET not in str(info.value) and HF_TOKEN not in str(info.value)
    with pytest.raises(RecastError, match="RECAST_CREDENTIALS_FILE is not set"):
        StoreSettings().credential("minio", "s3")

    broken = tmp_path / "broken.json"
    broken.write_text('{"x": {"type": "hf", "token": "' + HF_TOKEN + '"}')
    with pytest.raises(RecastError, match="not valid JSON") as info:
        StoreSettings(credentials_file=broken).credential("x", "hf")
    assert HF_TOKEN not in str(info.value)
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"k": {"type": "s3", "aws_access_key_id": "id", "password": S3_SECRET}}))
    with pytest.raises(RecastError, match="unknown fields password") as info:
        StoreSettings(credentials_file=incomplete).credential("k", "s3")
    assert S3_SECRET not in str(info.value)


# -- locations ---------------------------------------------------------------------------------------


def test_file_locations_are_confined_to_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "llama").mkdir(parents=True)
    (root / "escape").symlink_to(tmp_path)
    s = StoreSettings(file_roots=(root,))
    loc = parse_location(f"file://{root}/llama/", "source", s)
    assert loc == Location("file", (root / "llama").as_uri(), str(root / "llama"))
    assert parse_location(f"file://localhost{root}/new", "target", s).root == str(root / "new")
    for url in (
        f"file://{tmp_path}/other",
        f"file://{root}/escape/x",
        f"file://{root}",
    ):
        with pytest.raises(RecastError, match=r"^target: .*allowed roots \(" + str(root)):
            parse_location(url, "target", s)
    with pytest.raises(RecastError, match=r"^target: .*must not contain '\.\.' segments"):
        parse_location(f"file://{root}/../other", "target", s)
    with pytest.raises(RecastError, match=r"^source: .*set RECAST_FILE_ROOTS"):
        parse_location(f"file://{root}/llama", "source", StoreSettings())
    with pytest.raises(RecastError, match="not host 'server'"):
        parse_location("file://server/share", "source", s)


def test_s3_and_hf_locations() -> None:
    s = StoreSettings()
    assert parse_location("s3://my-bucket/a/b/", "target", s) == Location(
        "s3", "s3://my-bucket/a/b", "my-bucket", "a/b"
    )
    assert parse_location("s3://my.bucket", "target", s) == Location("s3", "s3://my.bucket", "my.bucket", "")
    assert parse_location("hf://org/Model-1.5_x", "source", s) == Location(
        "hf", "hf://org/Model-1.5_x", "org/Model-1.5_x"
    )
    pr = parse_location("hf://org/m@refs/pr/3", "source", s)
    assert (pr.root, pr.revision, pr.url) == ("org/m", "refs/pr/3", "hf://org/m@refs/pr/3")
    assert parse_location("hf://org/m@v1.0", "source", s).revision == "v1.0"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("s3://ab/x", "not a valid S3 bucket name"),
        ("s3://192.168.0.1/x", "not a valid S3 bucket name"),
        ("s3://bucket/a//b", "empty, '.' or '..' segments"),
        ("s3://bucket/a/../b", "empty, '.' or '..' segments"),
        ("s3://bucket/a?versionId=1", "query strings"),
        ("hf://model-without-org", "not a Hub model repo id"),
        ("hf://org/repo/extra", "not a Hub model repo id"),
        ("hf://org/re po", "not a Hub model repo id"),
        ("hf://org/a--b", "not a Hub model repo id"),
        ("hf://org/repo@", "not a valid revision"),
        ("hf://org/repo@../main", "not a valid revision"),
        ("http://example.com/model", "not a supported location"),
        ("gs://bucket/model", "not a supported location"),
        ("/abs/path", "not a supported location"),
        ("", "not a supported location"),
    ],
)
def test_bad_locations_name_the_field(url: str, expected: str) -> None:
    with pytest.raises(RecastError, match=expected) as info:
        parse_location(url, "target", StoreSettings(file_roots=(Path("/data"),)))
    assert str(info.value).startswith("target: ")
    if "not a supported location" in expected:
        assert "s3://bucket/prefix" in str(info.value) and "hf://org/repo" in str(info.value)


def test_credentials_in_urls_are_refused_and_masked() -> None:
    for url in (f"s3://AKIA:{S3_SECRET}@bucket/x", f"hf://user:{HF_TOKEN}@org/repo"):
        with pytest.raises(RecastError, match="reference a named credential") as info:
            parse_location(url, "source", StoreSettings())
        assert S3_SECRET not in str(info.value) and HF_TOKEN not in str(info.value)
        assert "***@" in str(info.value)


# -- S3 ----------------------------------------------------------------------------------------------


def test_s3_source_lists_sizes_and_reads_ranges(
    s3_server: str, s3_settings: StoreSettings, small_dir: Path
) -> None:
    bucket = _bucket(s3_server)
    upload_directory(s3_server, small_dir, bucket, "models/tiny")
    upload_directory(s3_server, small_dir, bucket, "models/tiny/.recast-staging/old-job")
    source = open_source(parse_location(f"s3://{bucket}/models/tiny/", "source", s3_settings), s3_settings)
    assert isinstance(source, S3Source) and source.description == f"s3://{bucket}/models/tiny"
    expected = sorted(p.relative_to(small_dir).as_posix() for p in small_dir.rglob("*") if p.is_file())
    assert source.list() == [n for n in expected if n != ".hidden"]
    shard = "model-00001-of-00002.safetensors"
    data = (small_dir / shard).read_bytes()
    assert source.size(shard) == len(data) and source.exists("sub/extra.txt") and not source.exists("nope")
    assert source.read_range(shard, 0, 8) == data[:8]
    assert source.read_range(shard, 1000, 5000) == data[1000:5000]
    assert source.read_range(shard, len(data) - 1, len(data)) == data[-1:]
    assert source.read_range(shard, 7, 7) == b""
    with pytest.raises(CheckpointError, match="truncated"):
        source.read_range(shard, len(data) - 10, len(data) + 10)
    with pytest.raises(CheckpointError, match="truncated"):
        source.read_range(shard, len(data) + 10, len(data) + 20)
    with pytest.raises(CheckpointError, match=r"missing.bin does not exist"):
        source.size("missing.bin")
    with pytest.raises(CheckpointError, match="does not exist"):
        source.read_range("missing.bin", 0, 4)
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        source.read_range("../other/config.json", 0, 4)
    with pytest.raises(CheckpointError, match="invalid byte range"):
        source.read_range(shard, 10, 4)


def test_s3_missing_bucket_is_permanent_and_names_it(s3_settings: StoreSettings) -> None:
    source = open_source(parse_location("s3://no-such-bucket-here/x", "source", s3_settings), s3_settings)
    with pytest.raises(CheckpointError, match=r"^s3://no-such-bucket-here/x: the bucket does not exist"):
        source.list()
    target = open_target(
        parse_location("s3://no-such-bucket-here/x", "target", s3_settings), s3_settings, "j1"
    )
    with pytest.raises(RecastError, match="bucket does not exist") as info:
        target.is_empty()
    assert not isinstance(info.value, TransientStorageError)


def test_s3_errors_are_classified_for_retry() -> None:
    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
        )

    for code, status in [
        ("SlowDown", 503),
        ("InternalError", 500),
        ("ServiceUnavailable", 503),
        ("503", 503),
    ]:
        assert isinstance(
            storage_error(client_error(code, status), "s3://b/k", None, CheckpointError),
            TransientStorageError,
        )
    connection = EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert isinstance(storage_error(connection, "s3://b/k", None, CheckpointError), TransientStorageError)
    denied = storage_error(client_error("AccessDenied", 403), "s3://b/k", "minio", CheckpointError)
    assert type(denied) is RecastError and "access denied" in str(denied) and "'minio'" in str(denied)
    missing = storage_error(client_error("NoSuchKey", 404), "s3://b/k", None, CheckpointError)
    assert type(missing) is CheckpointError and str(missing) == "s3://b/k: does not exist"


def test_part_size_keeps_multipart_uploads_within_10000_parts() -> None:
    assert part_size(100 * MIB, 64 * MIB) == 64 * MIB
    for size in (640_000 * MIB + 1, 5 << 40):
        parts = part_size(size, 64 * MIB)
        assert parts % MIB == 0 and -(-size // parts) <= 10_000


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stage_all(target: Target, files: dict[str, bytes], work: Path) -> dict[str, Receipt]:
    """Stage ``files`` (written under ``work`` first); the receipts come back through JSON, as from a ledger."""
    _files(work, files)
    receipts = {name: target.stage_file(name, work / name, _sha256(data)) for name, data in files.items()}
    return json.loads(json.dumps(receipts))


def _s3_traffic(client) -> list[tuple[str, int]]:
    """Record (operation, request body bytes) for every request ``client`` sends, in order."""
    sent: list[tuple[str, int]] = []
    client.meta.events.register(
        "before-send.s3",
        lambda event_name, request, **_: sent.append(
            (event_name.rsplit(".", 1)[1], int(request.headers.get("Content-Length", 0)))
        ),
    )
    return sent


def _sent_headers(client, operation: str) -> list[dict]:
    """The headers of every ``operation`` request ``client`` sends, as signed."""
    sent: list[dict] = []
    client.meta.events.register(
        f"before-send.s3.{operation}", lambda request, **_: sent.append(dict(request.headers))
    )
    return sent


def _signed_headers(headers: dict) -> list[str]:
    authorization = headers["Authorization"].decode()
    return authorization.split("SignedHeaders=")[1].split(",")[0].split(";")


def _keys(client, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def _uploads(client, bucket: str) -> list[str]:
    return sorted(u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def _forget(client, upload_ids: set[str]) -> None:
    """Answer CompleteMultipartUpload of ``upload_ids`` with NoSuchUpload, as S3 does a while after completing one.

    moto keeps answering a repeated completion with success (as S3 does at first) and fails with a 500 on
    an upload id it never had, so the later answer is given here, before the request is sent.
    """

    def answer(params: dict, **_: object) -> tuple[SimpleNamespace, dict] | None:
        if params["query_string"].get("uploadId") not in upload_ids:
            return None
        error = {"Code": "NoSuchUpload", "Message": "The specified upload does not exist."}
        return SimpleNamespace(status_code=404), {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 404}}

    client.meta.events.register("before-call.s3.CompleteMultipartUpload", answer)


def test_s3_target_uploads_each_byte_once_and_publishes_index_last(
    s3_server: str, s3_settings: StoreSettings, tmp_path: Path
) -> None:
    bucket = _bucket(s3_server)
    loc = parse_location(f"s3://{bucket}/out/native", "target", s3_settings)
    worker = open_target(loc, s3_settings, "job-1")
    assert isinstance(worker, S3Target) and worker.is_empty() and worker.local_dir() is None
    files = {
        "model-00001-of-00002.safetensors": os.urandom(11 * MIB + 123),  # three 5 MiB parts
        "model-00002-of-00002.safetensors": os.urandom(MIB),
        "config.json": b"{}",
        INDEX: b'{"weight_map": {}}',
        "recast.json": b'{"format": "native"}',
    }
    data_bytes = sum(len(d) for d in files.values())
    traffic = _s3_traffic(worker.client)
    receipts = _stage_all(worker, files, tmp_path / "work")

    assert sum(n for op, n in traffic if op == "UploadPart") == data_bytes, "every byte sent once"
    assert sum(n for op, n in traffic if op != "UploadPart") == 0, "markers and creates carry no data"
    assert [op for op, _ in traffic].count("UploadPart") == 3 + 1 + 3
    assert [len(r["parts"]) for r in receipts.values()] == [3, 1, 1, 1, 1]
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    assert _keys(client, bucket) == sorted(f"out/native/.recast-staging/job-1/{n}" for n in files)
    assert _uploads(client, bucket) == sorted(f"out/native/{n}" for n in files), "uploaded, not completed"
    assert worker.is_empty() and open_source(loc, s3_settings).list() == [], "nothing visible yet"
    assert S3_SECRET not in json.dumps(receipts) and "testing" not in json.dumps(receipts)

    finalize = open_target(loc, s3_settings, "job-1")  # another process, with the receipts only
    traffic = _s3_traffic(finalize.client)
    assert finalize.publish(receipts, "unused", create_pr=False) == {"url": f"s3://{bucket}/out/native"}
    completed = [op for op, _ in traffic if op == "CompleteMultipartUpload"]
    assert len(completed) == len(files)
    assert not {op for op, _ in traffic} & {"UploadPart", "CopyObject", "UploadPartCopy", "GetObject"}
    assert sum(n for _, n in traffic) < 4096, "publish moves no data: a few small XML bodies"
    assert _keys(client, bucket) == sorted(f"out/native/{n}" for n in files), "markers are gone"
    assert _uploads(client, bucket) == []
    for name, data in files.items():
        key = f"out/native/{name}"
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        assert (
            head["ChecksumSHA256"].split("-")[0] == receipts[name]["checksum"]["ChecksumSHA256"].split("-")[0]
        )
    assert not worker.is_empty() and open_source(loc, s3_settings).list() == sorted(files)

    traffic.clear()
    assert finalize.publish(receipts, "unused", create_pr=False) == {"url": f"s3://{bucket}/out/native"}
    assert _keys(client, bucket) == sorted(f"out/native/{n}" for n in files), (
        "publishing twice changes nothing"
    )


def test_s3_publish_completes_in_index_last_order(
    s3_server: str, s3_settings: StoreSettings, tmp_path: Path
) -> None:
    bucket = _bucket(s3_server)
    target = open_target(parse_location(f"s3://{bucket}/o", "target", s3_settings), s3_settings, "j")
    names = ["recast.json", INDEX, "a.safetensors", "config.json"]
    receipts = _stage_all(target, dict.fromkeys(names, b"x"), tmp_path)
    calls: list[str] = []
    target.client.meta.events.register(
        "before-parameter-build.s3.CompleteMultipartUpload", lambda params, **_: calls.append(params["Key"])
    )
    target.publish(receipts, "m", create_pr=False)
    assert calls == ["o/a.safetensors", "o/config.json", f"o/{INDEX}", "o/recast.json"]


def test_s3_publish_resumes_after_a_crash_midway(
    s3_server: str, s3_settings: StoreSettings, tmp_path: Path
) -> None:
    bucket = _bucket(s3_server)
    loc = parse_location(f"s3://{bucket}/o", "target", s3_settings)
    target = open_target(loc, s3_settings, "j")
    files = {"a.safetensors": os.urandom(6 * MIB), "b.safetensors": os.urandom(100), INDEX: b"{}"}
    receipts = _stage_all(target, files, tmp_path)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    first = receipts["a.safetensors"]
    client.complete_multipart_upload(  # the dead finalize got this far
        Bucket=bucket,
        Key=first["key"],
        UploadId=first["upload_id"],
        MultipartUpload={"Parts": first["parts"]},
    )
    assert _keys(client, bucket) == sorted(["o/a.safetensors", *(f"o/.recast-staging/j/{n}" for n in files)])

    retry = open_target(loc, s3_settings, "j")
    _forget(retry.client, {first["upload_id"]})
    assert retry.publish(receipts, "m", create_pr=False)["url"] == loc.url
    assert {n: client.get_object(Bucket=bucket, Key=f"o/{n}")["Body"].read() for n in files} == files
    assert _uploads(client, bucket) == [] and _keys(client, bucket) == sorted(f"o/{n}" for n in files)
    assert open_target(loc, s3_settings, "j").publish(receipts, "m", create_pr=False)["url"] == loc.url

    client.put_object(Bucket=bucket, Key="o/b.safetensors", Body=b"someone else's")
    _forget(retry.client, {receipts["b.safetensors"]["upload_id"]})
    with pytest.raises(
        RecastError, match=rf"^s3://{bucket}/o/b.safetensors: its upload is gone .* not this job"
    ):
        retry.publish(receipts, "m", create_pr=False)


def test_s3_discard_aborts_uploads_and_removes_all_the_job_wrote(
    s3_server: str, s3_settings: StoreSettings, tmp_path: Path
) -> None:
    bucket = _bucket(s3_server)
    loc = parse_location(f"s3://{bucket}/out", "target", s3_settings)
    mine, other = open_target(loc, s3_settings, "mine"), open_target(loc, s3_settings, "other")
    receipts = _stage_all(mine, {"a.bin": b"x" * 100, "nested/b.bin": b"y" * 100}, tmp_path / "m")
    _stage_all(other, {"c.bin": b"z"}, tmp_path / "o")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    # A worker of "mine" died after marking and starting an upload, before its receipt was recorded.
    client.put_object(Bucket=bucket, Key="out/.recast-staging/mine/crashed.bin", Body=b"")
    client.create_multipart_upload(Bucket=bucket, Key="out/crashed.bin")
    # A finalize of "mine" completed one upload before the job failed.
    a = receipts["a.bin"]
    client.complete_multipart_upload(
        Bucket=bucket, Key=a["key"], UploadId=a["upload_id"], MultipartUpload={"Parts": a["parts"]}
    )
    receipts["a.bin"]["upload_id"] = "forgotten"  # as S3 answers for a completed upload after a while

    mine.discard(receipts)
    mine.discard(receipts)
    open_target(loc, s3_settings, "mine").discard()
    assert _uploads(client, bucket) == ["out/c.bin"], "only the other job's upload is left"
    assert _keys(client, bucket) == ["out/.recast-staging/other/c.bin"]
    assert mine.is_empty() and other.is_empty()
    client.put_object(Bucket=bucket, Key="out/sub/existing.bin", Body=b"1")
    assert not mine.is_empty()
    bucket_root = open_target(parse_location(f"s3://{bucket}", "target", s3_settings), s3_settings, "j")
    assert not bucket_root.is_empty()


def test_s3_fresh_target_makes_shards_final_as_staged_and_the_index_at_publish(
    s3_server: str, s3_settings: StoreSettings, tmp_path: Path
) -> None:
    """A target that held nothing completes each shard as it is staged (the store's completion work then
    overlaps the conversion); the index and recast.json still wait for publish, and a failed job's
    discard removes the completed shards, also one whose receipt never reached the ledger."""
    bucket = _bucket(s3_server)
    loc = parse_location(f"s3://{bucket}/fresh", "target", s3_settings)
    worker = open_target(loc, s3_settings, "job-f", fresh=True)
    files = {
        "model-00001-of-00002.safetensors": os.urandom(6 * MIB),
        "model-00002-of-00002.safetensors": os.urandom(100),
        INDEX: b'{"weight_map": {}}',
        "recast.json": b'{"format": "native"}',
    }
    receipts = _stage_all(worker, files, tmp_path / "work")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    shards = sorted(n for n in files if n.startswith("model-"))
    assert [n for n, r in sorted(receipts.items()) if r.get("completed")] == shards
    assert open_source(loc, s3_settings).list() == shards, "the shards are final, the index is not"
    assert _uploads(client, bucket) == sorted(f"fresh/{n}" for n in (INDEX, "recast.json"))

    finalize = open_target(loc, s3_settings, "job-f", fresh=True)
    traffic = _s3_traffic(finalize.client)
    finalize.publish(receipts, "unused", create_pr=False)
    assert [op for op, _ in traffic].count("CompleteMultipartUpload") == 2, "only the index and recast.json"
    assert {n: client.get_object(Bucket=bucket, Key=f"fresh/{n}")["Body"].read() for n in files} == files
    assert _keys(client, bucket) == sorted(f"fresh/{n}" for n in files) and _uploads(client, bucket) == []

    failed = parse_location(f"s3://{bucket}/failed", "target", s3_settings)
    doomed = open_target(failed, s3_settings, "job-x", fresh=True)
    receipts = _stage_all(doomed, {"a.safetensors": b"a" * 100, INDEX: b"{}"}, tmp_path / "x")
    _stage_all(doomed, {"lost.safetensors": b"l" * 100}, tmp_path / "y")  # its worker died before the ledger
    assert open_source(failed, s3_settings).list() == ["a.safetensors", "lost.safetensors"]
    doomed.discard(receipts)
    assert open_source(failed, s3_settings).list() == [] and doomed.is_empty()
    assert not [k for k in _keys(client, bucket) if k.startswith("failed/")]
    assert not [u for u in _uploads(client, bucket) if u.startswith("failed/")]


def test_s3_failed_upload_is_aborted_and_transient(
    s3_server: str, s3_settings: StoreSettings, tmp_path: Path
) -> None:
    bucket = _bucket(s3_server)
    target = open_target(parse_location(f"s3://{bucket}/o", "target", s3_settings), s3_settings, "j")

    def drop(params: dict, **_: object) -> None:
        if params["PartNumber"] == 2:
            raise EndpointConnectionError(endpoint_url=s3_server)

    target.client.meta.events.register("before-parameter-build.s3.UploadPart", drop)
    path = _files(tmp_path, {"a.bin": os.urandom(11 * MIB)}) / "a.bin"
    with pytest.raises(TransientStorageError, match=rf"^s3://{bucket}/o/a.bin: cannot reach S3"):
        target.stage_file("a.bin", path, "0" * 64)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    assert _uploads(client, bucket) == [] and _keys(client, bucket) == ["o/.recast-staging/j/a.bin"]
    target.discard()
    assert _keys(client, bucket) == []


def test_s3_parts_carry_the_checksum_s3_verifies(
    s3_server: str, s3_settings: StoreSettings, tmp_path: Path
) -> None:
    bucket = _bucket(s3_server)
    target = open_target(parse_location(f"s3://{bucket}/o", "target", s3_settings), s3_settings, "j")
    sent: list[dict] = []
    target.client.meta.events.register(
        "before-parameter-build.s3.UploadPart", lambda params, **_: sent.append(dict(params))
    )
    headers = _sent_headers(target.client, "UploadPart")
    data = os.urandom(6 * MIB)
    receipt = target.stage_file("a.bin", _files(tmp_path, {"a.bin": data}) / "a.bin", _sha256(data))
    # the body is not hashed a second time for the signature: the signed checksum header covers it
    assert [h["X-Amz-Content-SHA256"] for h in headers] == [b"UNSIGNED-PAYLOAD"] * 2
    assert all("x-amz-checksum-sha256" in _signed_headers(h) for h in headers)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    assert client.list_multipart_uploads(Bucket=bucket)["Uploads"][0]["ChecksumAlgorithm"] == "SHA256"
    pieces = [data[: 5 * MIB], data[5 * MIB :]]
    assert [p["ChecksumSHA256"] for p in sorted(sent, key=lambda p: p["PartNumber"])] == [
        base64.b64encode(hashlib.sha256(piece).digest()).decode() for piece in pieces
    ]
    composite = hashlib.sha256(b"".join(hashlib.sha256(piece).digest() for piece in pieces)).digest()
    assert receipt["checksum"] == {"ChecksumSHA256": f"{base64.b64encode(composite).decode()}-2"}
    assert receipt["sha256"] == _sha256(data) and receipt["size"] == len(data)


def test_s3_stream_uploads_while_fed_and_gives_stage_files_receipt(
    s3_server: str, s3_settings: StoreSettings, tmp_path: Path
) -> None:
    bucket = _bucket(s3_server)
    loc = parse_location(f"s3://{bucket}/o", "target", s3_settings)
    target = open_target(loc, s3_settings, "j", fresh=True)
    traffic = _s3_traffic(target.client)
    data = os.urandom(11 * MIB + 123)
    upload = target.open_stream("a.bin", len(data))
    view, step = memoryview(data), MIB + 17  # pieces that straddle the 5 MiB parts
    for start in range(0, 6 * MIB, step):
        upload.write(view[start : start + step])
    time.sleep(0.5)  # the first part goes out while the rest is still being produced
    assert [op for op, _ in traffic].count("UploadPart") == 1
    for start in range(-(-6 * MIB // step) * step, len(data), step):
        upload.write(view[start : start + step])
    with pytest.raises(CheckpointError, match="more than the"):
        upload.write(memoryview(b"x"))  # past the announced size: refused, nothing kept
    receipt = json.loads(json.dumps(upload.finish(_sha256(data))))

    again = open_target(parse_location(f"s3://{bucket}/p", "target", s3_settings), s3_settings, "k")
    staged = again.stage_file("a.bin", _files(tmp_path, {"a.bin": data}) / "a.bin", _sha256(data))
    assert receipt["checksum"] == staged["checksum"] and receipt["size"] == staged["size"] == len(data)
    assert [p["ChecksumSHA256"] for p in receipt["parts"]] == [p["ChecksumSHA256"] for p in staged["parts"]]
    assert receipt["completed"], "a fresh target completes a shard as soon as it is whole"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    assert client.get_object(Bucket=bucket, Key="o/a.bin")["Body"].read() == data
    assert sum(n for op, n in traffic if op == "UploadPart") == len(data), "every byte sent once"


def test_s3_stream_fills_the_same_part_buffers_again(s3_server: str, s3_settings: StoreSettings) -> None:
    bucket = _bucket(s3_server)
    target = open_target(parse_location(f"s3://{bucket}/o", "target", s3_settings), s3_settings, "j")
    bodies: list[object] = []
    target.client.meta.events.register(
        "before-parameter-build.s3.UploadPart", lambda params, **_: bodies.append(params["Body"])
    )
    data = os.urandom(12 * 5 * MIB)
    upload = target.open_stream("a.bin", len(data))
    for start in range(0, len(data), 3 * MIB):
        upload.write(memoryview(data)[start : start + 3 * MIB])
    receipt = upload.finish(_sha256(data))
    target.publish({"a.bin": receipt}, "m", create_pr=False)
    assert len(bodies) == 12 and len({id(b) for b in bodies}) <= UPLOAD_THREADS + 1
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    assert client.get_object(Bucket=bucket, Key="o/a.bin")["Body"].read() == data


def test_s3_clients_share_the_parsed_model_and_keep_their_own_keys(
    creds_file: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = json.loads(creds_file.read_text())
    creds["other"] = {
        **creds["minio"],
        "aws_access_key_id": "other-key",
        "aws_secret_access_key": "other-secret",
    }
    creds_file.write_text(json.dumps(creds))
    settings = StoreSettings(credentials_file=creds_file)
    parsed: list[str] = []
    load = botocore.loaders.Loader.load_data_with_path

    def counted(self: botocore.loaders.Loader, name: str) -> object:
        parsed.append(name)
        return load(self, name)

    monkeypatch.setattr(botocore.loaders.Loader, "load_data_with_path", counted)
    monkeypatch.setattr(s3_store, "_session", None)  # as in a fresh process
    clients = {name: make_client(settings, name) for name in ("minio", "other", "minio")}
    models = [name for name in parsed if name.endswith("service-2")]
    assert len(models) == 1, f"S3's service model is parsed once per process, not per client: {models}"
    bucket = _bucket(s3_server)
    for name, client in clients.items():
        sent = _sent_headers(client, "ListObjectsV2")
        client.list_objects_v2(Bucket=bucket)
        assert f"Credential={creds[name]['aws_access_key_id']}/" in sent[0]["Authorization"].decode()


def test_s3_stream_aborted_leaves_nothing(s3_server: str, s3_settings: StoreSettings) -> None:
    bucket = _bucket(s3_server)
    target = open_target(parse_location(f"s3://{bucket}/o", "target", s3_settings), s3_settings, "j")
    with pytest.raises(RuntimeError, match="verification failed"), staging(target, "a.bin", 8 * MIB) as going:
        assert going.sink is not None
        going.sink.write(memoryview(os.urandom(6 * MIB)))
        raise RuntimeError("verification failed")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    assert _uploads(client, bucket) == [] and _keys(client, bucket) == ["o/.recast-staging/j/a.bin"]
    target.discard()
    assert _keys(client, bucket) == []


def test_an_abandoned_shard_stops_feeding_its_sink(tmp_path: Path) -> None:
    """A shard given up (a failed read, a cancel) sends its sink nothing more: the bytes still queued
    behind a slow upload are dropped, not uploaded only to be aborted."""
    got: list[int] = []
    first = threading.Event()

    class SlowSink:
        def write(self, data: memoryview) -> None:
            got.append(len(data))
            first.wait(10)  # the first write (the header) stalls, as a throttled upload would

    pieces = 8
    stream = ShardStream(
        tmp_path / "s.safetensors",
        b"{}",
        {"w": Slot(0, pieces * MIB, "U8", (pieces * MIB,))},
        sink=SlowSink(),
    )
    for i in range(pieces):
        stream.put("w", i * MIB, torch.zeros(MIB, dtype=torch.uint8))
    threading.Timer(0.3, first.set).start()
    stream.abort()
    assert got == [8 + 2], "only the header reached the sink"
    assert not list(tmp_path.iterdir()), "and no file was written"


def test_a_shard_streamed_to_s3_is_the_file_and_writes_none(
    s3_server: str, s3_settings: StoreSettings, checkpoint, tmp_path: Path
) -> None:
    conv = plan_conversion(checkpoint("deepseek-v3"), api.Options(to="native"))
    name = conv.shard_names()[0]
    file = conv.write_shard(name, tmp_path / "file", checks=conv.new_checks())
    bucket = _bucket(s3_server)
    target = open_target(parse_location(f"s3://{bucket}/o", "target", s3_settings), s3_settings, "j")
    checks = conv.new_checks()
    with staging(target, name, conv.planned_size(name)) as going:
        conv.write_shard(name, tmp_path / "streamed", checks=checks, sink=going.sink)
        receipt = going.stage(tmp_path / "streamed" / name, conv.hashes[name])
    assert not checks.failed and not any((tmp_path / "streamed").glob("*")), "no local copy"
    assert receipt["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    target.publish({name: receipt}, "", False)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    assert client.get_object(Bucket=bucket, Key=f"o/{name}")["Body"].read() == file.read_bytes()


@pytest.mark.parametrize("mode", ["when_required", "when_supported"])
def test_s3_request_checksum_mode_is_applied_without_upload_checksums(
    mode: str, s3_server: str, tmp_path: Path
) -> None:
    settings = StoreSettings(
        s3_endpoint_url=s3_server,
        s3_region="us-east-1",
        s3_checksum=mode,
        s3_upload_checksum="none",
        s3_addressing_style="path",
    )
    bucket = _bucket(s3_server)
    target = open_target(parse_location(f"s3://{bucket}/o", "target", settings), settings, "j")
    sent = _sent_headers(target.client, "UploadPart")
    payload = os.urandom(1000)
    receipts = _stage_all(target, {"x.bin": payload}, tmp_path)
    checksum_headers = [h for h in sent[0] if h.lower().startswith("x-amz-checksum-")]
    assert bool(checksum_headers) == (mode == "when_supported")
    # no checksum the store verifies: over plain HTTP the signature covers the body, as boto3 does it
    assert sent[0]["X-Amz-Content-SHA256"] == _sha256(payload).encode()
    assert receipts["x.bin"]["checksum"] == {}
    assert target.publish(receipts, "m", create_pr=False)["url"] == f"s3://{bucket}/o"
    source = open_source(parse_location(f"s3://{bucket}/o", "source", settings), settings)
    assert source.read_range("x.bin", 0, 1000) == payload
    assert target.publish(receipts, "m", create_pr=False)["url"] == f"s3://{bucket}/o"
    _forget(target.client, {receipts["x.bin"]["upload_id"]})  # then the object is checked by its ETag
    assert target.publish(receipts, "m", create_pr=False)["url"] == f"s3://{bucket}/o"


def test_s3_crc64nvme_upload_checksum(s3_server: str, tmp_path: Path) -> None:
    crc = pytest.importorskip("awscrt.checksums").crc64nvme
    settings = StoreSettings(s3_endpoint_url=s3_server, s3_region="us-east-1", s3_upload_checksum="crc64nvme")
    bucket = _bucket(s3_server)
    target = open_target(parse_location(f"s3://{bucket}/o", "target", settings), settings, "j")
    data = os.urandom(11 * MIB)
    receipts = _stage_all(target, {"a.bin": data}, tmp_path)
    whole = base64.b64encode(crc(data).to_bytes(8, "big")).decode()
    assert receipts["a.bin"]["checksum"] == {"ChecksumCRC64NVME": whole}
    target.publish(receipts, "m", create_pr=False)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    assert client.get_object(Bucket=bucket, Key="o/a.bin")["Body"].read() == data


def test_s3_named_credential_supplies_endpoint_and_never_leaks(
    creds_file: Path, small_dir: Path, s3_server: str
) -> None:
    bucket = _bucket(s3_server)
    upload_directory(s3_server, small_dir, bucket)
    settings = StoreSettings(credentials_file=creds_file)  # no endpoint: it comes from the credential
    source = open_source(parse_location(f"s3://{bucket}", "source", settings), settings, credential="minio")
    assert source.read_range("sub/extra.txt", 0, 5) == b"hello"
    assert S3_SECRET not in repr(source.__dict__)
    missing = open_source(
        parse_location("s3://absent-bucket", "source", settings), settings, credential="minio"
    )
    with pytest.raises(CheckpointError) as info:
        missing.list()
    assert S3_SECRET not in str(info.value) and "testing" not in str(info.value)
    with pytest.raises(RecastError, match="'hub' has type 'hf'"):
        open_source(parse_location(f"s3://{bucket}", "source", settings), settings, credential="hub")


def test_engine_converts_from_s3_like_from_disk(
    s3_server: str, s3_settings: StoreSettings, checkpoint, tmp_path: Path
) -> None:
    ckpt = checkpoint("mistral3-fp8")
    bucket = _bucket(s3_server)
    upload_directory(s3_server, ckpt, bucket, "vendor/m")
    source = open_source(parse_location(f"s3://{bucket}/vendor/m", "source", s3_settings), s3_settings)
    _assert_same_conversion(source, ckpt, tmp_path)


class _Latency:
    """A remote source whose every read waits ``delay`` s for its first byte, as a store's GET does,
    counting how many reads are in flight at once (the real source behind it does the reading)."""

    def __init__(self, inner: Source, delay: float):
        self.inner, self.delay, self.lock = inner, delay, threading.Lock()
        self.in_flight = self.most = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            time.sleep(self.delay)
            return self.inner.read_range(name, start, end)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_a_remote_sources_pieces_are_read_at_once(
    s3_server: str, s3_settings: StoreSettings, checkpoint, tmp_path: Path
) -> None:
    """A unit's pieces (an expert's weights and scales) from S3 are fetched together, not one GET after
    another: each GET's wait for its first byte would otherwise add up over a shard."""
    ckpt = checkpoint("deepseek-v3")
    bucket = _bucket(s3_server)
    upload_directory(s3_server, ckpt, bucket, "vendor/d")
    s3 = open_source(parse_location(f"s3://{bucket}/vendor/d", "source", s3_settings), s3_settings)
    slow = _Latency(s3, 0.02)
    conv = plan_conversion(slow, api.Options(to="native"))  # headers and scales: read concurrently already
    api.convert(ckpt, tmp_path / "local", api.Options(to="native"))
    for name in conv.shard_names():
        slow.most = 0
        written = conv.write_shard(name, tmp_path / "remote", checks=conv.new_checks())
        assert slow.most > 1, f"{name}: its pieces were read one after another"
        assert written.read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_remote_reads_work_in_a_forked_child() -> None:
    """A process forked after it read from a remote store (a Celery pool child of a parent that did)
    reads with threads of its own, not with the parent's, which did not come along."""
    assert _remote_pool().submit(lambda: 1).result() == 1  # the parent's pool now has an idle thread
    pid = os.fork()
    if pid == 0:
        try:
            ok = _remote_pool().submit(lambda: 2).result(timeout=5) == 2
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's read never ran"


def _assert_same_conversion(source: Source, local: Path, tmp_path: Path) -> None:
    api.convert(source, tmp_path / "remote", api.Options(to="native"))
    api.convert(local, tmp_path / "local", api.Options(to="native"))
    remote_files = sorted(p.name for p in (tmp_path / "remote").iterdir())
    assert remote_files == sorted(p.name for p in (tmp_path / "local").iterdir())
    for name in remote_files:
        if name not in ("recast.json", "SHA256SUMS"):  # recast.json records where the source was
            assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


# -- Hugging Face Hub --------------------------------------------------------------------------------


def test_hub_source_reads_a_pinned_commit(
    hub_server: HubServer, hub_settings: StoreSettings, small_dir: Path
) -> None:
    repo = _repo_id()
    sha = hub_server.add_repo(repo, small_dir)
    loc = parse_location(f"hf://{repo}", "source", hub_settings)
    pinned = pin_revision(loc, hub_settings)
    assert pinned == Location("hf", f"hf://{repo}@{sha}", repo, revision=sha)
    assert pin_revision(parse_location(f"hf://{repo}@main", "source", hub_settings), hub_settings) == pinned
    source = open_source(loc, hub_settings)
    assert isinstance(source, HubSource) and source.description == f"hf://{repo}@{sha}"

    hub_server.add_commit(repo, {"config.json": b'{"changed": true}\n'})
    assert source.list() == sorted(
        p.relative_to(small_dir).as_posix()
        for p in small_dir.rglob("*")
        if p.is_file() and p.name != ".hidden"
    )
    assert source.read_range("config.json", 0, 10) == (small_dir / "config.json").read_bytes()[:10]
    shard = "model-00002-of-00002.safetensors"  # an LFS file: redirected to the CDN origin
    data = (small_dir / shard).read_bytes()
    assert source.size(shard) == len(data) and source.exists(shard) and not source.exists("nope")
    assert source.read_range(shard, 100, 2100) == data[100:2100]
    assert source.read_range(shard, 0, len(data)) == data
    assert source.read_range(shard, 5, 5) == b""
    assert source.read_range("sub/extra.txt", 1, 5) == b"ello"
    assert open_source(loc, hub_settings).read_range("config.json", 0, 11) == b'{"changed":'
    with pytest.raises(CheckpointError, match="truncated"):
        source.read_range(shard, len(data) + 1, len(data) + 5)
    with pytest.raises(CheckpointError, match="no such file"):
        source.read_range("missing.bin", 0, 4)
    with pytest.raises(CheckpointError, match=r"missing.bin does not exist"):
        source.size("missing.bin")


def test_hub_private_repo_needs_the_named_token(
    hub_server: HubServer, small_dir: Path, creds_file: Path, tmp_path: Path
) -> None:
    repo = _repo_id("private")
    sha = hub_server.add_repo(repo, small_dir, private=True, token=HF_TOKEN)
    settings = StoreSettings(hf_endpoint=hub_server.endpoint, credentials_file=creds_file, scratch=tmp_path)
    loc = parse_location(f"hf://{repo}", "source", settings)
    for credential in (None, "wrong-hub"):
        with pytest.raises(
            CheckpointError, match=f"^hf://{repo}: repository not found or not visible"
        ) as info:
            open_source(loc, settings, credential=credential)
        assert HF_TOKEN not in str(info.value)
    pinned = parse_location(f"hf://{repo}@{sha}", "source", settings)
    anonymous = open_source(pinned, settings)  # pinned already: nothing is fetched until the first read
    with pytest.raises(CheckpointError, match="not visible to the ambient") as info:
        anonymous.read_range("config.json", 0, 4)
    assert HF_TOKEN not in str(info.value)

    source = open_source(loc, settings, credential="hub")
    shard = "model-00001-of-00002.safetensors"
    start = len(hub_server.log)
    assert source.read_range(shard, 0, 16) == (small_dir / shard).read_bytes()[:16]
    resolve, cdn = hub_server.log[start:]
    assert resolve[1].startswith(f"/{repo}/resolve/{sha}/") and resolve[2] == f"Bearer {HF_TOKEN}"
    assert cdn[1].startswith("/cdn/") and cdn[2] is None, "the token must not follow the redirect off the Hub"
    assert HF_TOKEN not in repr(source.__dict__)


def test_hub_errors_are_classified(
    hub_server: HubServer, hub_settings: StoreSettings, small_dir: Path
) -> None:
    repo = _repo_id()
    sha = hub_server.add_repo(repo, small_dir)
    with pytest.raises(CheckpointError, match="revision not found"):
        open_source(parse_location(f"hf://{repo}@no-such-branch", "source", hub_settings), hub_settings)
    with pytest.raises(CheckpointError, match="repository not found"):
        open_source(parse_location("hf://org/never-registered", "source", hub_settings), hub_settings)
    source = open_source(parse_location(f"hf://{repo}@{sha}", "source", hub_settings), hub_settings)
    hub_server.faults[f"/{repo}/resolve/{sha}/config.json"] = 503
    with pytest.raises(TransientStorageError, match="HTTP 503"):
        source.read_range("config.json", 0, 4)
    del hub_server.faults[f"/{repo}/resolve/{sha}/config.json"]
    assert source.read_range("config.json", 0, 4) == b'{"ar'

    closed = StoreSettings(hf_endpoint="http://127.0.0.1:9")
    with pytest.raises(TransientStorageError, match="cannot reach the Hub"):
        open_source(parse_location(f"hf://{repo}", "source", closed), closed)
    with pytest.raises(TransientStorageError, match="cannot reach the Hub"):
        open_source(parse_location(f"hf://{repo}@{sha}", "source", closed), closed).read_range(
            "config.json", 0, 4
        )


def test_engine_converts_from_the_hub_like_from_disk(
    hub_server: HubServer, hub_settings: StoreSettings, checkpoint, tmp_path: Path
) -> None:
    ckpt = checkpoint("mistral3-fp8")
    repo = _repo_id("vendor")
    hub_server.add_repo(repo, ckpt)
    source = open_source(parse_location(f"hf://{repo}", "source", hub_settings), hub_settings)
    _assert_same_conversion(source, ckpt, tmp_path)


def _commits(hub: HubServer, repo: str) -> int:
    return len(hub.repos[repo].commits)


def test_hub_workers_preupload_and_finalize_commits_once_from_receipts(
    hub_server: HubServer, hub_settings: StoreSettings, tmp_path: Path
) -> None:
    repo = _repo_id("out")
    first = hub_server.add_repo(repo, _files(tmp_path / "readme", {"README.md": b"# out\n"}))
    loc = parse_location(f"hf://{repo}", "target", hub_settings)
    shards = {
        "model-00001-of-00002.safetensors": os.urandom(4096),
        "model-00002-of-00002.safetensors": os.urandom(3000),
    }
    meta = {"config.json": b"{}", INDEX: b'{"weight_map": {}}', "recast.json": b'{"format": "native"}'}
    receipts: dict[str, Receipt] = {}
    start = len(hub_server.log)
    for i, (name, data) in enumerate(shards.items()):  # one worker per shard, each its own HubTarget
        worker = open_target(loc, hub_settings, "job-7")
        assert isinstance(worker, HubTarget) and worker.is_empty() and worker.local_dir() is None
        receipts |= _stage_all(worker, {name: data}, tmp_path / f"worker-{i}")
    receipts |= _stage_all(open_target(loc, hub_settings, "job-7"), meta, tmp_path / "meta")
    uploads = [path for method, path, _ in hub_server.log[start:] if method == "PUT"]
    assert sorted(uploads) == sorted(f"/lfs-upload/{_sha256(d)}" for d in shards.values())
    assert hub_server.repos[repo].refs["main"] == first and _commits(hub_server, repo) == 1, "no commit yet"
    assert all(receipts[n]["lfs"] for n in shards) and not any(receipts[n]["lfs"] for n in meta)
    shutil.rmtree(tmp_path / "worker-0")
    shutil.rmtree(tmp_path / "worker-1")
    shutil.rmtree(tmp_path / "meta")  # finalize publishes from the receipts alone

    finalize = open_target(loc, hub_settings, "job-7")
    start = len(hub_server.log)
    result = finalize.publish(receipts, "Convert with Recast", create_pr=False)
    assert not [p for method, p, _ in hub_server.log[start:] if method == "PUT"], "nothing uploaded again"
    head = hub_server.repos[repo].refs["main"]
    assert head != first and result == {"url": f"hf://{repo}@{head}", "commit": head}
    assert _commits(hub_server, repo) == 2, "one commit"
    assert {k: v for k, v in hub_server.files(repo).items() if k != ".gitattributes"} == {
        "README.md": b"# out\n",
        **shards,
        **meta,
    }
    assert not finalize.is_empty()
    reread = open_source(parse_location(result["url"], "source", hub_settings), hub_settings)
    assert (
        reread.read_range("model-00002-of-00002.safetensors", 0, 3000)
        == shards["model-00002-of-00002.safetensors"]
    )

    # A finalize that died after committing runs again, with recast.json written anew: no second commit.
    retried = {**receipts, "recast.json": {**receipts["recast.json"], "content": "e30="}}
    assert open_target(loc, hub_settings, "job-7").publish(retried, "Convert with Recast", False) == result
    assert _commits(hub_server, repo) == 2


def test_hub_target_pull_request_once_and_access(
    hub_server: HubServer, creds_file: Path, tmp_path: Path
) -> None:
    repo = _repo_id("pr")
    base = hub_server.add_repo(repo, private=True, token=HF_TOKEN)
    settings = StoreSettings(hf_endpoint=hub_server.endpoint, credentials_file=creds_file)
    loc = parse_location(f"hf://{repo}", "target", settings)
    denied = open_target(loc, settings, "j", credential="wrong-hub", create_pr=True)
    with pytest.raises(RecastError, match="create it on the Hub first") as info:
        denied.is_empty()
    assert HF_TOKEN not in str(info.value)
    target = open_target(loc, settings, "j", credential="hub", create_pr=True)
    receipts = _stage_all(target, {"a.safetensors": b"\x00" * 64, INDEX: b"{}"}, tmp_path / "w")
    assert HF_TOKEN not in json.dumps(receipts)
    result = target.publish(receipts, "Recast PR", create_pr=True)
    assert result["pr_url"] == f"{hub_server.endpoint}/{repo}/discussions/1"
    assert hub_server.repos[repo].refs["main"] == base, "a pull request leaves main alone"
    assert hub_server.repos[repo].refs["refs/pr/1"] == result["commit"]
    assert target.is_empty(), "main still has no weights"
    again = open_target(loc, settings, "j", credential="hub", create_pr=True)
    assert again.publish(receipts, "Recast PR", create_pr=True) == result
    assert hub_server.repos[repo].pulls == 1, "no second pull request"

    missing = open_target(parse_location("hf://org/not-created", "target", settings), settings, "j2")
    with pytest.raises(RecastError, match="create it on the Hub first"):
        missing.is_empty()
    target.discard(receipts)
    target.discard()


def test_hub_calls_time_out_and_a_lost_commit_is_not_made_twice(
    hub_server: HubServer, small_dir: Path, tmp_path: Path
) -> None:
    repo = _repo_id("stall")
    sha = hub_server.add_repo(repo, small_dir)
    settings = StoreSettings(hf_endpoint=hub_server.endpoint, hf_timeout_s=0.5)
    try:
        source = open_source(parse_location(f"hf://{repo}@{sha}", "source", settings), settings)
        hub_server.stalls[f"/{repo}/resolve/{sha}/config.json"] = 2.0
        started = time.monotonic()
        with pytest.raises(TransientStorageError, match="cannot reach the Hub"):
            source.read_range("config.json", 0, 4)
        assert time.monotonic() - started < 1.5

        out = _repo_id("stall-out")
        hub_server.add_repo(out)
        target = open_target(parse_location(f"hf://{out}", "target", settings), settings, "j")
        receipts = _stage_all(target, {"a.safetensors": os.urandom(100), INDEX: b"{}"}, tmp_path)
        hub_server.stalls[f"/api/models/{out}/commit/main"] = 2.0  # the Hub commits, but answers late
        started = time.monotonic()
        with pytest.raises(
            TransientStorageError, match=rf"^hf://{out}: cannot reach the Hub \(ReadTimeout\)"
        ):
            target.publish(receipts, "m", create_pr=False)
        assert time.monotonic() - started < 1.5
        hub_server.stalls.clear()
        time.sleep(2.0)  # the stalled commit lands
        assert _commits(hub_server, out) == 2
        ours = hub_server.repos[out].refs["main"]
        hub_server.add_commit(out, {"README.md": b"edited after"})  # someone commits before the retry
        result = target.publish(receipts, "m", create_pr=False)
        assert result["commit"] == ours and _commits(hub_server, out) == 3
    finally:
        hub_server.stalls.clear()


def test_a_later_jobs_identical_output_is_committed_by_that_job(
    hub_server: HubServer, hub_settings: StoreSettings, tmp_path: Path
) -> None:
    """publish knows its own commit by the job named in it, not by the bytes alone: a second job whose
    shards are the same bytes makes its own commit (its recast.json is its own)."""
    out = _repo_id("same")
    hub_server.add_repo(out)
    shard = os.urandom(100)
    loc = parse_location(f"hf://{out}", "target", hub_settings)
    results = []
    for job in ("first", "second"):
        target = open_target(loc, hub_settings, job)
        receipts = _stage_all(target, {"a.safetensors": shard, "recast.json": job.encode()}, tmp_path / job)
        results.append(target.publish(receipts, "m", create_pr=False))
        assert target.publish(receipts, "m", create_pr=False) == results[-1], "again: the same commit"
    assert results[0]["commit"] != results[1]["commit"] and _commits(hub_server, out) == 3
    assert hub_server.files(out)["recast.json"] == b"second"


# -- local directories -------------------------------------------------------------------------------


def test_file_target_writes_in_place_and_publishes_by_one_rename(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    settings = StoreSettings(file_roots=(root,))
    loc = parse_location(f"file://{root}/out", "target", settings)
    target = open_target(loc, settings, "j1")
    assert isinstance(target, FileTarget) and target.is_empty()
    staging = target.local_dir()
    assert staging == root / ".out.recast-j1" and staging.stat().st_dev == root.stat().st_dev
    written = _files(staging, {"a.safetensors": b"abc", "sub/b.json": b"{}"})
    inodes = {n: (written / n).stat().st_ino for n in ("a.safetensors", "sub/b.json")}
    receipts = {n: target.stage_file(n, staging / n, _sha256((staging / n).read_bytes())) for n in inodes}
    assert {n: (staging / n).stat().st_ino for n in inodes} == inodes, "staged in place: nothing moved"
    receipts |= _stage_all(target, {INDEX: b"{}"}, tmp_path / "scratch")
    assert not (tmp_path / "scratch" / INDEX).exists(), "a file from elsewhere is moved in"
    assert receipts["a.safetensors"] == {
        "size": 3,
        "sha256": _sha256(b"abc"),
        "inode": inodes["a.safetensors"],
    }
    (staging / ".a.safetensors.partial").write_bytes(b"a dead worker's")
    assert target.is_empty()

    finalize = open_target(loc, settings, "j1")
    assert finalize.publish(receipts, "m", create_pr=False) == {"url": (root / "out").as_uri()}
    assert {p.relative_to(root / "out").as_posix() for p in (root / "out").rglob("*") if p.is_file()} == set(
        receipts
    )
    assert (root / "out" / "a.safetensors").stat().st_ino == inodes["a.safetensors"], "renamed, not copied"
    assert not staging.exists() and not target.is_empty()
    assert finalize.publish(receipts, "m", create_pr=False) == {"url": (root / "out").as_uri()}, "idempotent"
    source = open_source(parse_location(f"file://{root}/out", "source", settings), settings)
    assert source.read_range("a.safetensors", 1, 3) == b"bc"

    again = open_target(loc, settings, "j2")
    other = _stage_all(again, {"a.safetensors": b"new"}, tmp_path / "work2")
    with pytest.raises(TargetExistsError):
        again.publish(other, "m", create_pr=False)
    with pytest.raises(RecastError, match=r"not the size its receipt says: a.safetensors"):
        again.publish({"a.safetensors": {**other["a.safetensors"], "size": 4}}, "m", create_pr=False)
    again.discard(other)
    again.discard()
    assert not again.staging.exists() and (root / "out" / "a.safetensors").read_bytes() == b"abc"
    with pytest.raises(RecastError, match="cannot publish, the staging directory is gone"):
        again.publish(other, "m", create_pr=False)
    with pytest.raises(RecastError, match="job id"):
        open_target(loc, settings, "../escape")


def test_file_target_copies_across_filesystems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second writable filesystem at /dev/shm")
    source = shm / f"recast-test-{uuid.uuid4().hex}"
    source.write_bytes(b"payload")
    try:
        target = FileTarget(tmp_path / "out", "j")
        receipt = target.stage_file("x.bin", source, _sha256(b"payload"))
        assert receipt == {
            "size": 7,
            "sha256": _sha256(b"payload"),
            "inode": (target.staging / "x.bin").stat().st_ino,
        }
        assert (target.staging / "x.bin").read_bytes() == b"payload" and not source.exists()
        assert sorted(p.name for p in target.staging.iterdir()) == ["x.bin"], "no partial file is left"
    finally:
        source.unlink(missing_ok=True)
