"""S3 (and S3-compatible) sources and targets.

Reads are ranged GETs, so the engine fetches shard headers and tensor slices without downloading whole
shards. A target stages under ``<prefix>/.recast-staging/<job_id>/`` and publishes by server-side copy,
index and recast.json last, because S3 has no atomic rename: a reader that finds the index finds every
shard it names. Checksum behaviour is configurable because boto3 >= 1.36 sends CRC checksums that several
S3-compatible stores reject. Multipart uploads abandoned by a crashed worker are aborted by ``discard``;
a bucket lifecycle rule for incomplete uploads is still worth having.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
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

from . import TransientStorageError, check_range, publish_order
from .listed import ListedSource
from .locations import Location
from .settings import StoreSettings

STAGING = ".recast-staging"
MAX_PARTS = 10_000
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


def make_client(settings: StoreSettings, credential: str | None) -> BaseClient:
    """A boto3 S3 client from the settings, with the named credential's keys, region and endpoint on top."""
    cred = settings.credential(credential, "s3")
    session = boto3.session.Session(
        aws_access_key_id=cred.get("aws_access_key_id"),
        aws_secret_access_key=cred.get("aws_secret_access_key"),
        aws_session_token=cred.get("aws_session_token"),
        region_name=cred.get("region") or settings.s3_region,
    )
    config = Config(
        s3={"addressing_style": settings.s3_addressing_style},
        request_checksum_calculation=settings.s3_checksum,
        response_checksum_validation=settings.s3_checksum,
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=32,  # the engine's prefetch thread plus managed transfers' worker threads
    )
    return session.client(
        "s3", endpoint_url=cred.get("endpoint_url") or settings.s3_endpoint_url, config=config
    )


def part_size(size: int, chunk: int) -> int:
    """Part size for a ``size``-byte upload: ``chunk``, grown in whole MiB to stay within 10,000 parts."""
    needed = -(-size // MAX_PARTS)
    return chunk if needed <= chunk else -(-needed // _MIB) * _MIB


def transfer_config(size: int, chunk: int) -> TransferConfig:
    return TransferConfig(multipart_threshold=chunk, multipart_chunksize=part_size(size, chunk))


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


class S3Target:
    """Output under ``s3://bucket/prefix``, staged in ``<prefix>/.recast-staging/<job_id>/``."""

    def __init__(self, loc: Location, settings: StoreSettings, job_id: str, credential: str | None = None):
        self.client = make_client(settings, credential)
        self.bucket = loc.root
        self.base = f"{loc.prefix}/" if loc.prefix else ""
        self.staging_prefix = f"{self.base}{STAGING}/{job_id}"
        self.description = loc.url
        self.chunk = settings.s3_multipart_chunk_bytes
        self.credential = credential
        self._errors = _Errors(credential, RecastError)

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

    def stage_file(self, name: str, path: Path) -> None:
        key = f"{self.staging_prefix}/{check_relative(name, self.description)}"
        config = transfer_config(path.stat().st_size, self.chunk)
        with self._errors.about(f"s3://{self.bucket}/{key}"):
            self.client.upload_file(str(path), self.bucket, key, Config=config)

    def staged(self) -> S3Source:
        return S3Source(self.client, self.bucket, self.staging_prefix, self.credential)

    def publish(self, names: list[str], commit_message: str, create_pr: bool) -> dict[str, str]:
        """Server-side copy each staged file into place, index and recast.json last, then drop staging.

        ``commit_message`` and ``create_pr`` only mean something on the Hub.
        """
        staged = self.staged().sizes()
        if missing := sorted(set(names) - set(staged)):
            raise RecastError(f"{self.description}: cannot publish, not staged: {', '.join(missing)}")
        for name in publish_order(names):
            source = {"Bucket": self.bucket, "Key": f"{self.staging_prefix}/{name}"}
            with self._errors.about(f"s3://{self.bucket}/{self.base}{name}"):
                self.client.copy(
                    source, self.bucket, self.base + name, Config=transfer_config(staged[name], self.chunk)
                )
        self.discard()
        return {"url": self.description}

    def discard(self) -> None:
        """Delete the staging objects and abort unfinished multipart uploads into staging."""
        prefix = f"{self.staging_prefix}/"
        with self._errors.about(f"s3://{self.bucket}/{prefix}"):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                for upload in page.get("Uploads", []):
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if not keys:
                    continue
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True}
                )
                if errors := response.get("Errors"):
                    first = errors[0]
                    raise RecastError(
                        f"s3://{self.bucket}/{first.get('Key')}: cannot delete staged object "
                        f"({first.get('Code')}); {len(errors)} staged objects remain"
                    )
