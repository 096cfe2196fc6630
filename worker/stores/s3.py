"""S3 (and S3-compatible) sources and targets.

Reads are ranged GETs, so the engine fetches shard headers and tensor slices without downloading whole
shards. Checksum behaviour of requests is configurable because boto3 >= 1.36 sends CRC checksums that
several S3-compatible stores reject.

The commit protocol of a target, which moves every output byte once:

1. ``open_stream`` (or ``stage_file``, for a finished file) writes an empty marker
   ``<prefix>/.recast-staging/<job_id>/<name>``, then uploads the file as a multipart upload of its
   *final* key ``<prefix>/<name>``, each part with a checksum that S3 verifies on arrival (SHA-256 per
   part, or CRC64-NVME over the whole object), and does not complete it. A shard streams: its parts go
   out while the engine produces it, and no local copy of it is written.
   The receipt names the upload and its parts' ETags and checksums.
   A *fresh* target (nothing under the prefix when the job was planned, so no earlier checkpoint can be
   damaged) completes each upload right away, except the index's and recast.json's: completing a large
   object costs the store time (AWS warns it can take minutes), which is then spent beside the other
   shards' conversion instead of after the last one.
2. ``publish`` completes each upload from its receipt that is not complete yet, index and recast.json
   last, then aborts any other upload of a marked key (an earlier attempt of a shard) and deletes the
   markers.
3. ``discard`` aborts the receipts' uploads and every upload of a marked key, deletes the markers, and
   deletes final objects this job completed (same size and checksum as the receipt; for a fresh target,
   whatever is at a marked key, since it can only be this job's).

What a reader sees: until publish, no index exists, and for a target that held a checkpoint before, no
final key at all (an uncompleted upload is invisible, and readers ignore hidden keys such as the markers),
so the old checkpoint stays whole until publish replaces it; shards appear one by one (during the job for
a fresh target, during publish otherwise), and the index only after every shard it names. S3 has no
atomic multi-object commit, so index-last is the guarantee: a reader that finds the index finds a
complete checkpoint. What a dead worker leaves: an uncompleted upload (and
its marker), found through the marker by ``publish`` or ``discard``; a bucket lifecycle rule that aborts
incomplete uploads after some days is still worth having for uploads whose job record itself is lost. A
finalize that dies halfway through publishing is run again with the same receipts: an upload that no
longer exists but whose final object has the receipt's size and checksum counts as done.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from worker.engine.errors import CheckpointError, RecastError
from worker.engine.storage import check_relative

from . import INDEX, SIDECAR, Receipt, TransientStorageError, check_range, publish_order
from .listed import ListedSource
from .locations import Location
from .settings import StoreSettings

COMPLETERS = 16  # uploads completed at once when publishing (each completion is one round trip)
STAGING = ".recast-staging"
MAX_PARTS = 10_000
# Parts of one file in flight at once: each holds a part in memory, (threads + 1) x part size in all.
UPLOAD_THREADS = 4
_MIB = 1 << 20
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
    }
)
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
    }
)
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})


# One boto3 session per process, shared by every client: a session parses S3's service model (about a
# megabyte of JSON) on its first client, ~0.15 s that a fresh session per client paid on every task.
# Clients take their credential's keys and region as arguments, so the shared session holds no secret
# and a rotated credentials file applies to the next client as before. Creating clients from one
# session is not thread-safe in botocore, hence the lock.
_session: boto3.session.Session | None = None
_session_lock = threading.Lock()


def _after_fork() -> None:
    global _session_lock
    _session_lock = threading.Lock()  # a lock another thread held at the fork would stay held


os.register_at_fork(after_in_child=_after_fork)


def make_client(settings: StoreSettings, credential: str | None) -> BaseClient:
    """A boto3 S3 client from the settings, with the named credential's keys, region and endpoint on top."""
    global _session
    cred = settings.credential(credential, "s3")
    config = Config(
        s3={"addressing_style": settings.s3_addressing_style},
        request_checksum_calculation=settings.s3_checksum,
        response_checksum_validation=settings.s3_checksum,
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=32,  # the engine's concurrent remote reads, and the upload threads
    )
    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _session.client(
            "s3",
            aws_access_key_id=cred.get("aws_access_key_id"),
            aws_secret_access_key=cred.get("aws_secret_access_key"),
            aws_session_token=cred.get("aws_session_token"),
            region_name=cred.get("region") or settings.s3_region,
            endpoint_url=cred.get("endpoint_url") or settings.s3_endpoint_url,
            config=config,
        )


def part_size(size: int, chunk: int) -> int:
    """Part size for a ``size``-byte upload: ``chunk``, grown in whole MiB to stay within 10,000 parts."""
    needed = -(-size // MAX_PARTS)
    return chunk if needed <= chunk else -(-needed // _MIB) * _MIB


def storage_error(
    exc: Exception, what: str, credential: str | None, missing: type[RecastError]
) -> RecastError:
    """Turn a boto3 failure about ``what`` (a URL) into a retryable or a permanent RecastError.

    Messages carry the S3 error code and the credential's name only: never a key, never the server's text.
    """
    err: BaseException | None = exc
    while err is not None and not isinstance(err, ClientError | BotoCoreError):
        err = err.__cause__ or err.__context__
    who = f"the credential {credential!r}" if credential else "the default AWS credentials"
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _TRANSIENT_CODES or status >= 500 or (code.isdigit() and int(code) >= 500):
            return TransientStorageError(
                f"{what}: S3 is unavailable or throttling ({code or status}); retry later"
            )
        if code == "NoSuchBucket":
            return missing(
                f"{what}: the bucket does not exist; check the URL (Recast does not create buckets)"
            )
        if code in _MISSING_CODES:
            return missing(f"{what}: does not exist")
        if code == "InvalidRange":
            return CheckpointError(f"{what}: the requested bytes lie past the end of the object; truncated")
        if code in _ACCESS_CODES or status in (401, 403) or code in ("401", "403"):
            return RecastError(
                f"{what}: access denied ({code}); check that {who} may use this bucket and prefix"
            )
        return RecastError(f"{what}: S3 request failed ({code or 'error'}, HTTP {status})")
    if isinstance(err, NoCredentialsError):
        return RecastError(
            f"{what}: no AWS credentials found; name a credential from RECAST_CREDENTIALS_FILE "
            "or configure the default AWS credential chain"
        )
    if isinstance(err, BotoConnectionError | HTTPClientError | IncompleteReadError):
        return TransientStorageError(f"{what}: cannot reach S3 ({type(err).__name__}); retry later")
    return RecastError(f"{what}: S3 request failed ({type(err or exc).__name__})")


class _Errors:
    """Translates boto3 exceptions for one bucket and credential."""

    def __init__(self, credential: str | None, missing: type[RecastError]):
        self.credential = credential
        self.missing = missing

    @contextmanager
    def about(self, what: str) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise storage_error(exc, what, self.credential, self.missing) from exc


class S3Source(ListedSource):
    """Objects under ``s3://bucket/prefix``, read by ranged GETs; the listing is fetched once and cached.

    Keys with a hidden path component (such as ``.recast-staging/``) are not part of the checkpoint.
    """

    def __init__(self, client: BaseClient, bucket: str, prefix: str, credential: str | None = None):
        self.client = client
        self.bucket = bucket
        self.key_prefix = f"{prefix}/" if prefix else ""
        self.description = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._errors = _Errors(credential, CheckpointError)
        self._sizes: dict[str, int] | None = None

    @classmethod
    def open(cls, loc: Location, settings: StoreSettings, credential: str | None = None) -> S3Source:
        return cls(make_client(settings, credential), loc.root, loc.prefix, credential)

    def _url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key_prefix}{name}"

    def sizes(self) -> dict[str, int]:
        """Every object's size by relative name (one paginated listing, then cached)."""
        if self._sizes is None:
            sizes: dict[str, int] = {}
            with self._errors.about(self.description):
                pages = self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self.key_prefix
                )
                for page in pages:
                    for obj in page.get("Contents", []):
                        name = obj["Key"][len(self.key_prefix) :]
                        parts = name.split("/")
                        if name and not any(p == "" or p.startswith(".") for p in parts):
                            sizes[name] = obj["Size"]
            self._sizes = sizes
        return self._sizes

    def read_range(self, name: str, start: int, end: int) -> bytes:
        check_range(self._url(check_relative(name, self.description)), start, end)
        if start == end:
            return b""
        with self._errors.about(self._url(name)):
            response = self.client.get_object(
                Bucket=self.bucket, Key=self.key_prefix + name, Range=f"bytes={start}-{end - 1}"
            )
            data = response["Body"].read()
        if len(data) != end - start:
            raise CheckpointError(
                f"{self._url(name)}: expected {end - start} bytes at offset {start}, "
                f"got {len(data)}; truncated"
            )
        return data


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def multipart_etag(parts: list[dict[str, Any]]) -> str | None:
    """The ETag S3 gives the completed upload (MD5 of the parts' binary ETags, then ``-<count>``).

    None where a part's ETag is not hex, as on stores that do not follow S3's scheme.
    """
    try:
        joined = b"".join(binascii.unhexlify(p["ETag"].strip('"')) for p in parts)
    except (binascii.Error, ValueError):
        return None
    return f'"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(parts)}"'


def _unsigned_part_payload(request: Any, **_: Any) -> None:
    """Sign a part's headers but not its body (``UNSIGNED-PAYLOAD``), as boto3 already does over HTTPS.

    Over plain HTTP (an in-cluster MinIO, say) boto3 signs the body too: one more SHA-256 over every
    byte uploaded, beside the part checksum the store verifies. That checksum header is itself signed,
    so the store still refuses a part whose bytes changed on the way; registered only when parts carry
    one (``RECAST_S3_UPLOAD_CHECKSUM`` other than ``none``).
    """
    config = request.context["client_config"]
    unsigned = Config(s3={**(config.s3 or {}), "payload_signing_enabled": False})
    request.context["client_config"] = config.merge(unsigned)


class _Checksums:
    """The checksum S3 verifies each part against (``RECAST_S3_UPLOAD_CHECKSUM``), and the whole object's."""

    def __init__(self, mode: str):
        self.mode = mode
        self._crc64: Any = None
        if mode == "crc64nvme":
            try:
                from awscrt.checksums import crc64nvme
            except ImportError:
                raise RecastError(
                    "RECAST_S3_UPLOAD_CHECKSUM=crc64nvme needs the awscrt package (pip install 'botocore[crt]'); "
                    "or use sha256"
                ) from None
            self._crc64 = crc64nvme

    def create_args(self) -> dict[str, str]:
        """Arguments to create_multipart_upload: which checksum every part must carry."""
        if self.mode == "sha256":
            return {"ChecksumAlgorithm": "SHA256"}
        if self.mode == "crc64nvme":
            return {"ChecksumAlgorithm": "CRC64NVME", "ChecksumType": "FULL_OBJECT"}
        return {}

    def part(self, data: bytes) -> dict[str, str]:
        """The checksum argument of upload_part for ``data`` (S3 refuses the part if it does not match)."""
        if self.mode == "sha256":
            return {"ChecksumSHA256": _b64(hashlib.sha256(data).digest())}
        if self.mode == "crc64nvme":
            return {"ChecksumCRC64NVME": _b64(self._crc64(data).to_bytes(8, "big"))}
        return {}

    def running(self, data: bytes, crc: int) -> int:
        """The whole object's CRC64-NVME so far, with ``data`` appended (0 in the other modes)."""
        return self._crc64(data, crc) if self._crc64 is not None else 0

    def whole(self, parts: list[dict[str, Any]], crc: int) -> dict[str, str]:
        """The object's checksum as S3 reports it once complete: composite SHA-256, or full CRC64-NVME."""
        if self.mode == "sha256":
            digests = b"".join(base64.b64decode(p["ChecksumSHA256"]) for p in parts)
            return {"ChecksumSHA256": f"{_b64(hashlib.sha256(digests).digest())}-{len(parts)}"}
        if self.mode == "crc64nvme":
            return {"ChecksumCRC64NVME": _b64(crc.to_bytes(8, "big"))}
        return {}


class S3Target:
    """Output under ``s3://bucket/prefix``, uploaded once to the final keys and completed on ``publish``."""

    def __init__(
        self,
        loc: Location,
        settings: StoreSettings,
        job_id: str,
        credential: str | None = None,
        fresh: bool = False,
    ):
        self.client = make_client(settings, credential)
        self.fresh = fresh
        self.bucket = loc.root
        self.base = f"{loc.prefix}/" if loc.prefix else ""
        self.markers = f"{self.base}{STAGING}/{job_id}/"
        self.description = loc.url
        self.chunk = settings.s3_multipart_chunk_bytes
        self.checksums = _Checksums(settings.s3_upload_checksum)
        self._errors = _Errors(credential, RecastError)
        if self.checksums.mode != "none":
            self.client.meta.events.register("before-sign.s3.UploadPart", _unsigned_part_payload)

    def _url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def is_empty(self) -> bool:
        """No object under the prefix other than staging areas (one delimited listing page, usually)."""
        with self._errors.about(self.description):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.base, Delimiter="/"
            )
            for page in pages:
                if any(obj["Key"] != self.base for obj in page.get("Contents", [])):
                    return False
                if any(p["Prefix"] != f"{self.base}{STAGING}/" for p in page.get("CommonPrefixes", [])):
                    return False
        return True

    def local_dir(self) -> None:
        """S3 has no local filesystem: shards stream to ``open_stream`` while they are produced, other
        files are written to scratch and uploaded by ``stage_file``."""
        return None

    def stage_file(self, name: str, path: Path, sha256: str) -> Receipt:
        """Upload ``path`` to its final key as a multipart upload left uncompleted; ``path`` is kept."""
        size = path.stat().st_size
        upload = self.open_stream(name, size)
        try:
            with path.open("rb") as file:
                while data := file.read(upload.part_bytes):
                    upload.send(data)
            return upload.finish(sha256)
        except BaseException:
            upload.abort()
            raise

    def open_stream(self, name: str, size: int) -> S3Upload:
        """Begin ``name``'s multipart upload, to be fed its ``size`` bytes in order while they are produced
        (an engine ``Sink``); ``finish`` gives the receipt ``stage_file`` would."""
        key = self.base + check_relative(name, self.description)
        with self._errors.about(self._url(key)):
            # The marker comes first, so that a worker dying at any later point leaves an upload that
            # publish and discard can find.
            self.client.put_object(Bucket=self.bucket, Key=self.markers + name, Body=b"")
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, **self.checksums.create_args()
            )["UploadId"]
        return S3Upload(self, name, key, upload_id, size)

    def _receipt(self, upload: S3Upload, sha256: str, parts: list[dict[str, Any]], crc: int) -> Receipt:
        receipt = {
            "key": upload.key,
            "upload_id": upload.upload_id,
            "size": upload.size,
            "sha256": sha256,
            "parts": parts,
            "checksum": self.checksums.whole(parts, crc),
        }
        if self.fresh and upload.name not in (INDEX, SIDECAR):  # the files that define the checkpoint wait
            self._complete(upload.name, receipt)
            receipt["completed"] = True
        return receipt

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes | bytearray) -> dict[str, Any]:
        checksum = self.checksums.part(data)
        response = self.client.upload_part(
            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data, **checksum
        )
        return {"PartNumber": number, "ETag": response["ETag"], **checksum}

    def _abort(self, key: str, upload_id: str) -> bool:
        """Abort one upload; False if it no longer exists (completed or aborted already)."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if _code(exc) != "NoSuchUpload":
                raise
            return False
        return True

    def _check_receipt(self, name: str, receipt: Receipt) -> str:
        key = self.base + check_relative(name, self.description)
        if receipt.get("key") != key:
            raise RecastError(
                f"{self._url(key)}: the receipt for {name} names another key; not this target's"
            )
        return key

    def _is_published(self, key: str, receipt: Receipt) -> bool:
        """The final object exists and is the receipt's: same size and checksum (ETag without one)."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                return False
            raise
        if head["ContentLength"] != receipt["size"]:
            return False
        # S3 reports a composite checksum as "<b64>-<parts>", some stores without the suffix.
        checked = [k for k in receipt["checksum"] if head.get(k)]
        if checked:
            return all(head[k].split("-")[0] == receipt["checksum"][k].split("-")[0] for k in checked)
        return head.get("ETag") == multipart_etag(receipt["parts"])

    def publish(
        self, staged: dict[str, Receipt], commit_message: str, create_pr: bool, replace: bool = False
    ) -> dict[str, str]:
        """Complete every upload, index and recast.json last, then clear the job's other uploads and markers.

        ``commit_message`` and ``create_pr`` only mean something on the Hub. Safe to run again after a crash:
        an upload that is gone counts as done if its final object is the receipt's.
        """
        order = publish_order([n for n, r in staged.items() if not r.get("completed")])
        last = [n for n in order if n in (INDEX, SIDECAR)]
        with ThreadPoolExecutor(max_workers=COMPLETERS) as pool:  # shards at once: each is one round trip
            list(
                pool.map(lambda name: self._complete(name, staged[name]), [n for n in order if n not in last])
            )
        for name in last:  # then the files that define the checkpoint, in order
            self._complete(name, staged[name])
        self._clear_marked()
        if replace:
            self._remove_others(set(staged))
        return {"url": self.description}

    def _complete(self, name: str, receipt: Receipt) -> None:
        """Complete one file's upload, or find it completed by an earlier publish."""
        key = self._check_receipt(name, receipt)
        extra = {}
        if "ChecksumCRC64NVME" in receipt["checksum"]:  # S3 checks the whole object's CRC against it
            extra = {**receipt["checksum"], "ChecksumType": "FULL_OBJECT"}
        with self._errors.about(self._url(key)):
            try:
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=receipt["upload_id"],
                    MultipartUpload={"Parts": receipt["parts"]},
                    **extra,
                )
            except ClientError as exc:
                if _code(exc) != "NoSuchUpload":
                    raise
                if not self._is_published(key, receipt):
                    raise RecastError(
                        f"{self._url(key)}: its upload is gone and the object there is not this job's "
                        "output (size or checksum differ); run the job again"
                    ) from None

    def _remove_others(self, names: set[str]) -> None:
        """Delete the objects under the prefix that are not this output (an overwritten checkpoint's)."""
        staging = f"{self.base}{STAGING}/"
        with self._errors.about(self.description):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.base
            ):
                stale = [
                    {"Key": obj["Key"]}
                    for obj in page.get("Contents", [])
                    if not obj["Key"].startswith(staging) and obj["Key"][len(self.base) :] not in names
                ]
                if stale:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": stale, "Quiet": True})

    def discard(self, staged: dict[str, Receipt] | None = None) -> None:
        """Abort this job's uploads and delete its markers, and any final object a partial publish left.

        Never call it for a job that succeeded: the published objects match their receipts and would go.
        """
        for name, receipt in (staged or {}).items():
            key = self._check_receipt(name, receipt)
            with self._errors.about(self._url(key)):
                if not self._abort(key, receipt["upload_id"]) and self._is_published(key, receipt):
                    self.client.delete_object(Bucket=self.bucket, Key=key)
        self._clear_marked(remove_objects=self.fresh)

    def _clear_marked(self, remove_objects: bool = False) -> None:
        """Abort every unfinished upload of a key this job marked, then delete the markers; with
        ``remove_objects``, also the objects at those keys (a fresh target's, whose receipts may never
        have reached the ledger).

        After publish these are earlier attempts of a shard (its receipt's upload is complete by then);
        after a failure, also uploads whose worker died before its receipt was recorded.
        """
        with self._errors.about(self._url(self.markers)):
            marked: list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.markers
            ):
                marked += [obj["Key"] for obj in page.get("Contents", [])]
            if not marked:
                return
            keys = {self.base + m[len(self.markers) :] for m in marked}
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.base
            ):
                for upload in page.get("Uploads", []):
                    if upload["Key"] in keys:
                        self._abort(upload["Key"], upload["UploadId"])
            doomed = marked + sorted(keys) if remove_objects else marked
            for start in range(0, len(doomed), 1000):  # delete_objects takes at most 1,000 keys
                batch = [{"Key": k} for k in doomed[start : start + 1000]]
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                if errors := response.get("Errors"):
                    first = errors[0]
                    raise RecastError(
                        f"{self._url(first.get('Key', self.markers))}: cannot delete the job's marker or "
                        f"object ({first.get('Code')}); {len(errors)} remain"
                    )


class S3Upload:
    """One file's multipart upload, fed in order: every ``part_bytes`` received become a part, uploaded
    while the next ones arrive, ``UPLOAD_THREADS`` parts in flight (which bounds its memory to
    (threads + 1) x part size, and slows the producer to the upload's pace).

    As an engine ``Sink`` (``write``) it takes a shard's bytes while the shard is produced, so a worker
    converts and uploads at once, and the output never touches its disk.
    """

    def __init__(self, target: S3Target, name: str, key: str, upload_id: str, size: int):
        self.target, self.name, self.key, self.upload_id, self.size = target, name, key, upload_id, size
        self.part_bytes = part_size(size, target.chunk)
        self._buf = bytearray()  # the part being filled, allocated on the first write
        self._filled = 0
        self._sent = 0
        self._crc = 0
        self._parts: list[dict[str, Any]] = []
        self._pending: deque[tuple[Future[dict[str, Any]], bytes | bytearray]] = deque()
        # Part buffers whose upload is done, filled again: a fresh 64 MiB bytearray is zeroed and
        # faulted in page by page, which cost more than copying the part into it.
        self._spare: list[bytearray] = []
        self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="recast-upload")

    def write(self, data: memoryview) -> None:
        """Copy ``data`` into the current part; each full part goes out."""
        self._within(self._filled + len(data))
        while len(data):
            if not self._buf:
                self._buf = self._spare.pop() if self._spare else bytearray(self.part_bytes)
            n = min(len(data), self.part_bytes - self._filled)
            self._buf[self._filled : self._filled + n] = data[:n]
            self._filled += n
            data = data[n:]
            if self._filled == self.part_bytes:
                self.send(self._buf)
                self._buf, self._filled = bytearray(), 0

    def send(self, data: bytes | bytearray) -> None:
        """Upload ``data`` as the next part (every part but the last is ``part_bytes`` long)."""
        self._within(len(data))
        self._sent += len(data)
        self._crc = self.target.checksums.running(data, self._crc)
        if len(self._pending) >= UPLOAD_THREADS:
            future, done = self._pending.popleft()
            with self.target._errors.about(self.target._url(self.key)):
                self._parts.append(future.result())
            if isinstance(done, bytearray) and len(done) == self.part_bytes:
                self._spare.append(done)
        number = len(self._parts) + len(self._pending) + 1
        future = self._pool.submit(self.target._upload_part, self.key, self.upload_id, number, data)
        self._pending.append((future, data))

    def _within(self, more: int) -> None:
        """Refuse bytes past the size announced, before any of them is kept or sent."""
        if self._sent + more > self.size:
            raise CheckpointError(f"{self.target._url(self.key)}: more than the {self.size} bytes announced")

    def finish(self, sha256: str) -> Receipt:
        """Send the last part, wait for every part, and return the receipt (completed for a fresh target)."""
        if self._filled or not self._sent:
            self.send(bytes(memoryview(self._buf)[: self._filled]))
        if self._sent != self.size:
            raise CheckpointError(
                f"{self.target._url(self.key)}: {self._sent} bytes uploaded, {self.size} announced"
            )
        with self.target._errors.about(self.target._url(self.key)):
            self._parts += [future.result() for future, _ in self._pending]
            self._pending.clear()
            self._pool.shutdown()
            return self.target._receipt(self, sha256, self._parts, self._crc)

    def abort(self) -> None:
        """Stop and abort the upload (its marker still leads ``discard`` to it if this fails)."""
        self._pool.shutdown(cancel_futures=True)
        with suppress(ClientError, BotoCoreError):
            self.target._abort(self.key, self.upload_id)
