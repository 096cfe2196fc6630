"""Remote sources and targets for the conversion engine: local directories, S3 and the Hugging Face Hub.

The engine reads through ``Source`` (worker/engine/storage.py); job workers write through ``Target``, and
every output byte moves once. A shard is written where it will live (``file://``: the target's own
staging directory) or uploaded once, straight to its final place but not yet visible (``s3://``: an
uncompleted multipart upload of the final key, fed while the shard is produced through ``open_stream``;
``hf://``: an LFS object that no commit references yet, uploaded from scratch). ``stage_file`` (or the
stream's ``finish``) returns a small JSON receipt, which the job records in its ledger; ``publish``, on any
machine and from the receipts alone, makes everything visible in one step where the store has one (a
rename, a commit) and index-last where it does not (S3), so readers of the final location never see a
half-written checkpoint, and it can be run again after dying halfway. ``discard`` removes what a failed
job left. Failures that may succeed on retry (network, throttling, 5xx, timeouts) raise
``TransientStorageError`` for the job layer to back off and retry; everything else is a ``RecastError``
that names the location and what to do.

The S3 and Hub back ends are imported on first use: the API process parses locations but should not
pay for importing boto3 or huggingface_hub.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from worker.engine.errors import CheckpointError, RecastError
from worker.engine.storage import LocalSource, Source

from .locations import Location, parse_location
from .settings import StoreSettings

# The names worker.engine.checkpoint uses; not imported from there because that module loads torch.
INDEX = "model.safetensors.index.json"
SIDECAR = "recast.json"
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


class TransientStorageError(RecastError):
    """The store failed in a way that may pass (connection, timeout, throttling, 5xx): retry with backoff."""

    code = "storage_unavailable"


# What stage_file returns and publish/discard take back: JSON, no secrets; every one has "size" and "sha256".
Receipt = dict[str, Any]


class Upload(Protocol):
    """A file on its way to a target while it is produced (an engine ``Sink``): ``write`` its bytes in
    order, then ``finish`` with its SHA-256 for the receipt, or ``abort``, which leaves nothing behind."""

    def write(self, data: memoryview) -> None: ...

    def finish(self, sha256: str) -> Receipt: ...

    def abort(self) -> None: ...


class Target(Protocol):
    """Where a job's output goes: each file to its final place once, visible only after ``publish``."""

    description: str

    def is_empty(self) -> bool:
        """Nothing is at the final location yet (a job refuses to write over an existing checkpoint)."""
        ...

    def local_dir(self) -> Path | None:
        """A directory on the target's own filesystem to write output files into directly (file://),
        or None: write them to local scratch and hand each to stage_file, which uploads it."""
        ...

    def open_stream(self, name: str, size: int) -> Upload | None:
        """Where the ``size`` bytes of ``name`` can go while they are produced, in order (stage_file's
        work done as the file is written, with no local copy), or None: this target wants the file."""
        ...

    def stage_file(self, name: str, path: Path, sha256: str) -> Receipt:
        """Make the finished local file ``path`` (its SHA-256 already known) ready to publish as ``name``
        without its bytes moving again; returns a JSON-serialisable receipt (recorded in the job's ledger,
        possibly by another process) that ``publish`` and ``discard`` take back. May delete ``path``."""
        ...

    def publish(
        self, staged: dict[str, Receipt], commit_message: str, create_pr: bool, replace: bool = False
    ) -> dict[str, str]:
        """Make every staged name final from its receipt, index and recast.json last; idempotent.
        With ``replace`` (a job's ``overwrite``), whatever the target held before and the output does not
        is removed. Returns {"url": ...} plus "commit"/"pr_url" where the store has them."""
        ...

    def discard(self, staged: dict[str, Receipt] | None = None) -> None:
        """Remove everything this job wrote or started (staging dir, multipart uploads); safe twice."""
        ...


class Staging:
    """One output file on its way to a target: handed over while it is written where the target takes a
    stream (``sink``, for the engine's ``write_shard``), else written to a file and staged from there."""

    def __init__(self, target: Target, name: str, size: int):
        self.target, self.name = target, name
        self.sink = target.open_stream(name, size)

    def stage(self, path: Path, sha256: str) -> Receipt:
        """The receipt, once the file (at ``path`` unless streamed) is whole and its SHA-256 known."""
        if self.sink is not None:
            return self.sink.finish(sha256)
        return self.target.stage_file(self.name, path, sha256)


@contextmanager
def staging(target: Target, name: str, size: int) -> Iterator[Staging]:
    """``Staging`` of ``name``'s ``size`` bytes; a stream begun is aborted if the block fails."""
    staged = Staging(target, name, size)
    try:
        yield staged
    except BaseException:
        if staged.sink is not None:
            staged.sink.abort()
        raise


def publish_order(names: list[str]) -> list[str]:
    """``names`` with the index and recast.json last: a reader that sees the index sees complete shards."""
    last = (INDEX, SIDECAR)
    return [n for n in names if n not in last] + [n for n in last if n in names]


def check_range(where: str, start: int, end: int) -> None:
    """Reject a reversed or negative range up front: S3 and HTTP servers answer one with the whole file."""
    if not 0 <= start <= end:
        raise CheckpointError(f"{where}: invalid byte range [{start}, {end})")


def check_job_id(job_id: str) -> str:
    """Job ids become path and key components, so only plain ones are accepted."""
    if not _JOB_ID.fullmatch(job_id):
        raise RecastError(f"job id {job_id!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return job_id


def open_source(loc: Location, settings: StoreSettings, credential: str | None = None) -> Source:
    """A ``Source`` over ``loc``; an hf location is pinned to a commit first so every read sees one commit."""
    if loc.scheme == "file":
        return LocalSource(loc.root)
    if loc.scheme == "s3":
        from .s3 import S3Source

        return S3Source.open(loc, settings, credential)
    from .hub import HubSource

    if loc.revision is None or not _COMMIT_SHA.fullmatch(loc.revision):
        loc = pin_revision(loc, settings, credential)
    return HubSource(loc, settings, credential)


def pin_revision(loc: Location, settings: StoreSettings, credential: str | None = None) -> Location:
    """For hf, resolve the revision (default ``main``) to its commit SHA; other schemes come back as is."""
    if loc.scheme != "hf":
        return loc
    from .hub import resolve_commit

    sha = resolve_commit(loc, settings, credential)
    return Location("hf", f"hf://{loc.root}@{sha}", loc.root, revision=sha)


def open_target(
    loc: Location,
    settings: StoreSettings,
    job_id: str,
    credential: str | None = None,
    create_pr: bool = False,
    fresh: bool = False,
) -> Target:
    """The ``Target`` for job ``job_id`` writing to ``loc``.

    ``create_pr`` says the job will publish as a Hub pull request: its uploads then ask only for the right
    to open one, not to push to the branch. ``fresh`` says the location held nothing when the job was
    planned: S3 may then make each shard final as it is staged (index last still defines the checkpoint).
    """
    check_job_id(job_id)
    if loc.scheme == "file":
        from .local import FileTarget

        return FileTarget(Path(loc.root), job_id)
    if loc.scheme == "s3":
        from .s3 import S3Target

        return S3Target(loc, settings, job_id, credential, fresh)
    from .hub import HubTarget

    return HubTarget(loc, settings, job_id, credential, create_pr)


__all__ = [
    "Location",
    "Receipt",
    "StoreSettings",
    "Target",
    "TransientStorageError",
    "open_source",
    "open_target",
    "parse_location",
    "pin_revision",
]
