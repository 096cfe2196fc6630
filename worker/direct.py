"""Conversions run in this process between any two locations: what ``recast convert`` and ``recast
verify`` do with the service's location syntax.

A command-line argument is a plain local path, or a URL as a job takes it (``file://``, ``s3://``,
``hf://org/repo[@rev]``), read and written through ``worker.stores`` with the settings and credentials
the service's workers use (``RECAST_S3_*``, ``RECAST_HF_*``, ``RECAST_CREDENTIALS_FILE``; without a
credential name, boto3's default chain and the ambient Hugging Face token). A local target goes through
the engine's own ``convert``; a remote one through the same ``Target`` commit protocol as a job: each
shard is written to local scratch, verified in flight, uploaded once and published with the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker import model_card
from worker.engine import api
from worker.engine.checkpoint import MANIFEST, SIDECAR
from worker.engine.convert import Conversion, plan_conversion
from worker.engine.errors import RecastError, TargetExistsError, VerificationError
from worker.engine.options import Options, Progress
from worker.engine.pipeline import lanes, run_lanes
from worker.engine.publish import file_sha256, finish_sidecar
from worker.engine.report import Report
from worker.engine.storage import LocalSource, Source
from worker.stores import (
    Location,
    Receipt,
    StoreSettings,
    Target,
    open_source,
    open_target,
    parse_location,
    pin_revision,
    staging,
)

SCHEMES = ("file://", "s3://", "hf://")


def settings_from_env() -> StoreSettings:
    """The service's store settings, with ``file://`` open to any local path: on one's own machine the
    command line may read and write whatever its user can (``RECAST_FILE_ROOTS`` guards the service)."""
    return dataclasses.replace(StoreSettings.from_env(), file_roots=(Path("/"),))


def parse_argument(arg: str, name: str, settings: StoreSettings) -> Location:
    """A command-line location: a URL as a job takes it, or a plain path (relative to here), which is
    always local, even where it contains ``:``. Errors name the argument."""
    if "://" not in arg:
        path = Path(arg).expanduser().absolute()
        return Location("file", path.as_uri(), str(path))
    if not arg.startswith(SCHEMES):
        scheme = arg.partition("://")[0]
        shown = f"{scheme}://" if re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) else "this"
        raise RecastError(
            f"{name}: {shown} is not a supported location; use a local path, file:///absolute/path, "
            "s3://bucket/prefix or hf://org/repo[@revision]"
        )
    return parse_location(arg, name, settings)


def source_of(loc: Location, settings: StoreSettings, credential: str | None) -> Source:
    """The checkpoint at ``loc`` to read; an hf location is pinned to one commit first."""
    if loc.scheme == "file":
        return LocalSource(loc.root)
    return open_source(loc, settings, credential)


def convert(
    src: Location,
    dst: Location,
    opts: Options,
    settings: StoreSettings,
    progress: Progress | None = None,
    source_credential: str | None = None,
    target_credential: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> tuple[Report, str]:
    """Convert the checkpoint at ``src`` into ``dst``; returns the report and where it was published."""
    requested = src
    if src.scheme != "file":
        pinned = pin_revision(src, settings, source_credential)
        opts = dataclasses.replace(opts, source_location=src.url, source_revision=pinned.revision)
        src = pinned
    source = source_of(src, settings, source_credential)
    if dst.scheme == "file":
        return api.convert(source, dst.root, opts, progress), Path(dst.root).as_uri()
    if dst.scheme == "hf":
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # one bar per uploaded file would break into the conversion's own

    def card(conv: Conversion, report: dict[str, Any], meta: Path, original: str | None) -> str:
        return model_card.render(
            source=requested, source_revision=opts.source_revision, target_repo=dst.root,
            hub_endpoint=settings.hf_endpoint, report=report, source_config=conv.ckpt.config,
            output_config=conv.direction.config, manifest=(meta / MANIFEST).read_text(), job_id=job_id,
            original=original, output_keys=conv.direction.layout.where,
        )  # fmt: skip

    job_id = f"cli-{os.getpid()}-{secrets.token_hex(4)}"

    def target_for(fresh: bool) -> Target:
        return open_target(dst, settings, job_id, target_credential, create_pr, fresh)

    settings.scratch.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=settings.scratch))
    try:
        return _to_target(source, opts, target_for, scratch, progress, commit_message, create_pr, card)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _to_target(
    source: Source,
    opts: Options,
    target_for: Callable[[bool], Target],
    scratch: Path,
    progress: Progress | None,
    commit_message: str | None,
    create_pr: bool,
    card: Callable[[Conversion, dict[str, Any], Path, str | None], str],
) -> tuple[Report, str]:
    """Each shard streamed to the target while it is written (S3), or written to scratch and staged at
    once, so scratch holds at most the shards in flight (verified in flight either way); then the
    metadata (and a Hub target's model card), and one publish. ``target_for(fresh)`` opens the target;
    fresh: it held nothing, so S3 may complete shards as they come."""
    started = time.monotonic()
    conv = plan_conversion(source, opts)
    target = target_for(False)
    fresh = target.is_empty()
    if not fresh and not opts.overwrite:
        raise TargetExistsError(f"{target.description} already holds files; pass --overwrite to replace it")
    if fresh:
        target = target_for(True)
    staged: dict[str, Receipt] = {}
    lock = threading.Lock()

    def locked(event: dict) -> None:
        if progress is not None:
            with lock:
                progress(event)

    checks = conv.new_checks() if opts.verify else None

    def shard(name: str) -> None:
        """Write and upload (at once where the target takes a stream): the shard is reported done once
        its upload is."""
        with staging(target, name, conv.planned_size(name)) as going:
            path = conv.write_shard(
                name, scratch, lambda e: None if e.get("done") else locked(e), checks, going.sink
            )
            receipt = going.stage(path, conv.hashes[name])
        with lock:
            staged[name] = receipt
        locked({"shard": name, "done": True})

    try:
        locked({"bytes_total": conv.ckpt.total_bytes, "shards": conv.shard_names()})
        run_lanes([lambda n=n: shard(n) for n in conv.shard_names()], lanes(conv.dev.type))
        meta = scratch / "meta"
        meta.mkdir()
        names = conv.write_metadata(meta)
        card_plan = model_card.card_plan(target, meta, names, opts.overwrite)
        report = conv.new_report()
        if checks is not None:
            conv.check_kept_scales(checks, meta)
            conv.settle(checks, report, {n: r["size"] for n, r in staged.items()})
        report.seconds = time.monotonic() - started
        report.bytes_in = conv.ckpt.total_bytes
        report.bytes_out = conv.layout.total_bytes()
        files = conv.hashes | {n: file_sha256(meta / n) for n in names if n != SIDECAR}
        names = [n for n in names if n != SIDECAR] + finish_sidecar(meta, report, files)
        report.stages = conv.timings.as_dict()
        if opts.verify and not report.passed:
            raise VerificationError(
                f"verification failed: {report.failure_summary()}; nothing was published", report
            )
        if card_plan is not None and card_plan["write"]:
            (meta / model_card.CARD).write_text(card(conv, report.to_json(), meta, card_plan["original"]))
            names.append(model_card.CARD)
        for name in names:
            staged[name] = target.stage_file(name, meta / name, file_sha256(meta / name))
        message = commit_message or f"Recast: {report.direction} conversion with {report.adapter}"
        result = target.publish(staged, message, create_pr, opts.overwrite)
    except BaseException:
        with contextlib.suppress(RecastError):  # the error that stopped the conversion is the one to report
            target.discard(staged)
        raise
    return report, result.get("pr_url") or result["url"]


def verify(
    src: Location,
    dst: Location,
    settings: StoreSettings,
    device: str,
    wrap: Callable[[Source], Source] | None = None,
    source_credential: str | None = None,
    target_credential: str | None = None,
) -> Report:
    """Re-check the conversion of ``src`` at ``dst``, both read where they are."""
    written = source_of(dst, settings, target_credential)
    if wrap is not None:
        written = wrap(written)
    return api.verify(source_of(src, settings, source_credential), written, device=device)
