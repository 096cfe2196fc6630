"""A job's life on the workers: plan it, convert its shards and write its metadata (any worker, any
order), finalize, publish.

Plain functions over the job store and the engine; ``worker.tasks`` wraps them as Celery tasks. Every
step is safe to run again: a redelivered shard that the ledger already holds is skipped, the final
step resumes from whatever state it finds, and cancellation is checked between work units.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core import metrics
from core.fleet import Fleet
from core.jobstore import Conflict, JobStore
from core.settings import Settings
from core.states import ACTIVE, TERMINAL
from worker import model_card
from worker.engine.checkpoint import MANIFEST
from worker.engine.convert import Conversion, plan_conversion
from worker.engine.errors import RecastError, TargetBusyError, TargetExistsError, VerificationError
from worker.engine.options import Options
from worker.engine.publish import file_sha256, finish_sidecar
from worker.engine.storage import Source
from worker.stores import Target, TransientStorageError, open_source, open_target, parse_location, staging
from worker.throttle import ThrottledSource

log = logging.getLogger("recast.jobs")
PROGRESS_EVERY_S = 0.5


class JobCancelled(Exception):
    """Raised between work units when the job was cancelled meanwhile."""


class RetryLater(Exception):
    """A transient failure; the task layer re-queues with backoff."""


@dataclass
class Context:
    store: JobStore
    settings: Settings
    enqueue_shard: Callable[[str, str], None]
    enqueue_finalize: Callable[[str], None]
    enqueue_metadata: Callable[[str], None]


# The ledger entry of the metadata files the plan fixes (sidecar scales, carried files, config, index):
# written by a unit of its own beside the shards, so that finalize waits for no source read. Not a file
# name: no shard can take it.
METADATA = "@metadata"


# A worker process converts many shards of the same job: plan once per job, not once per shard.
_plans: dict[str, Conversion] = {}


def _options(job: dict[str, Any]) -> Options:
    req = job["request"]
    return Options(
        to=req["to"],
        adapter=req.get("adapter"),
        dtype=req.get("dtype", "bf16"),
        quantize=req.get("quantize", "keep"),
        format=req.get("format"),
        verify=req.get("verify", True),
        source_location=req["source"],
        source_revision=job.get("source_revision") or None,
    )


def _source(ctx: Context, job: dict[str, Any]) -> Source:
    req = job["request"]
    loc = parse_location(job.get("source_pinned") or req["source"], "source", ctx.settings.stores)
    source = open_source(loc, ctx.settings.stores, req.get("source_credential"))
    if ctx.settings.read_limit_bytes_s:
        source = ThrottledSource(source, ctx.settings.read_limit_bytes_s)
    return source


def _target(ctx: Context, job: dict[str, Any]) -> Target:
    req = job["request"]
    loc = parse_location(req["target"], "target", ctx.settings.stores)
    return open_target(
        loc, ctx.settings.stores, job["id"], req.get("target_credential"), bool(req.get("create_pr")),
        fresh=job.get("fresh_target") == "1",
    )  # fmt: skip


def _conversion(ctx: Context, job: dict[str, Any]) -> Conversion:
    conv = _plans.get(job["id"])
    if conv is None:
        _plans.clear()
        conv = _plans[job["id"]] = plan_conversion(_source(ctx, job), _options(job))
    return conv


def _scratch(ctx: Context, job_id: str, part: str) -> Path:
    path = ctx.settings.stores.scratch / job_id / f"{part}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _fail(ctx: Context, job_id: str, code: str, message: str) -> None:
    try:
        ctx.store.transition(job_id, ("queued", *ACTIVE), "failed", error_code=code, error_message=message)
    except Conflict:
        return
    log.warning("job %s failed: %s: %s", job_id, code, message)
    _discard(ctx, job_id)


def _receipts(ledger: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The target's receipt of every file the ledger records: the shards' and the metadata's."""
    staged = {n: e["receipt"] for n, e in ledger.items() if n != METADATA and e.get("receipt")}
    meta = ledger.get(METADATA, {}).get("files", {})
    return staged | {n: f["receipt"] for n, f in meta.items()}


def _ledger_complete(ctx: Context, job: dict[str, Any]) -> bool:
    return len(ctx.store.ledger(job["id"])) == (job.get("ledger_total") or job["shards_total"])


def _recorded(ctx: Context, job: dict[str, Any], entry: str) -> bool:
    """``entry`` is in the ledger already (a redelivered unit); queue finalize if the ledger is complete,
    since the delivery that recorded it may have died before queueing it."""
    if not ctx.store.shard_done(job["id"], entry):
        return False
    if _ledger_complete(ctx, job):
        ctx.enqueue_finalize(job["id"])
    return True


def _stage_metadata(target: Target, meta: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Stage the small files ``names`` under ``meta`` at once (a round trip or three each); each one's
    SHA-256, size and receipt."""

    def stage(name: str) -> dict[str, Any]:
        sha = file_sha256(meta / name)
        receipt = target.stage_file(name, meta / name, sha)
        return {"sha256": sha, "size": receipt["size"], "receipt": receipt}

    with ThreadPoolExecutor(max_workers=len(names) or 1) as pool:
        return dict(zip(names, pool.map(stage, names), strict=True))


def _discard(ctx: Context, job_id: str) -> None:
    """Remove staged output and scratch; safe to call from any worker, any number of times."""
    job = ctx.store.get(job_id)
    if job is not None:
        try:
            _target(ctx, job).discard(_receipts(ctx.store.ledger(job_id)))
        except RecastError as exc:
            log.warning("job %s: could not remove staged output: %s", job_id, exc)
    shutil.rmtree(ctx.settings.stores.scratch / job_id, ignore_errors=True)
    _plans.pop(job_id, None)


def _settle_cancel(ctx: Context, job_id: str) -> None:
    _discard(ctx, job_id)
    with contextlib.suppress(Conflict):
        ctx.store.transition(job_id, ("cancelling",), "cancelled", step="cancelled")


def guarded(ctx: Context, job_id: str, unit: str, body: Callable[[dict[str, Any]], None]) -> None:
    """Run one unit of a job: skip finished jobs, settle cancellations, count attempts, map errors."""
    job = ctx.store.get(job_id)
    if job is None or job["state"] in TERMINAL:
        return
    if job["state"] == "cancelling":
        _settle_cancel(ctx, job_id)
        return
    attempt = ctx.store.attempt(job_id, unit)
    if attempt > ctx.settings.max_attempts:
        _fail(ctx, job_id, "attempts_exhausted",
              f"{unit} was started {attempt - 1} times without finishing (its worker died or timed out "
              "each time; is it running out of memory?)")  # fmt: skip
        return
    try:
        body(job)
        ctx.store.attempt(job_id, unit, -1)
    except JobCancelled:
        _settle_cancel(ctx, job_id)
    except Conflict as exc:  # another worker or the API moved the job on; it owns what comes next
        log.info("job %s %s: stopped, the job is now %s", job_id, unit, exc.state)
        if exc.state == "cancelling":
            _settle_cancel(ctx, job_id)
        elif exc.state in ("failed", "cancelled"):
            # this unit staged its output after the unit that ended the job discarded the job's
            _discard(ctx, job_id)
    except TransientStorageError as exc:
        ctx.store.attempt(job_id, unit, -1)
        log.warning("job %s %s: transient storage error, will retry: %s", job_id, unit, exc)
        raise RetryLater(str(exc)) from exc
    except RecastError as exc:
        _fail(ctx, job_id, exc.code, str(exc))
    except Exception as exc:
        log.exception("job %s %s crashed", job_id, unit)
        _fail(ctx, job_id, "internal_error", f"{unit}: {type(exc).__name__}: {exc}")


# A job this long in ``queued`` with no planning task queued was orphaned by an API that died between
# recording it and queueing it; well above the time a healthy submission takes.
STRANDED_AFTER_S = 60.0


def sweep(
    ctx: Context, enqueue_plan: Callable[[str], None], older_than_s: float = STRANDED_AFTER_S
) -> list[str]:
    """Queue the planning task of every stranded job; returns their ids."""
    found = ctx.store.stranded(older_than_s)
    for job_id in found:
        log.warning("job %s was recorded but never queued; queueing it now", job_id)
        enqueue_plan(job_id)
        ctx.store.mark_enqueued(job_id)
    return found


def give_up(ctx: Context, job_id: str, message: str) -> None:
    _fail(ctx, job_id, "storage_unavailable", f"storage kept failing after retries: {message}")


def _check_cancel(ctx: Context, job_id: str) -> None:
    """Stop a unit whose job was cancelled, or failed in another unit: its output would only be discarded."""
    job = ctx.store.get(job_id)
    if job is None or job["state"] in ("cancelling", "cancelled", "failed"):
        raise JobCancelled


def plan_job(ctx: Context, job_id: str) -> None:
    def body(job: dict[str, Any]) -> None:
        if job["state"] == "queued":
            ctx.store.transition(job_id, ("queued",), "running", step="planning")
        # The API recorded the target's canonical URL; a job recorded before it did claims the URL as given.
        if other := ctx.store.claim_target(job_id, job.get("target_claim") or job["request"]["target"]):
            raise TargetBusyError(
                f"target: {job['request']['target']} is being written by job {other}; wait for it to end "
                "or cancel it, then submit again"
            )
        conv = _conversion(ctx, job)
        target = _target(ctx, job)
        # Decided once: an earlier attempt of this plan may have seen shards completed into a fresh target.
        empty = job["fresh_target"] == "1" if job.get("fresh_target") else target.is_empty()
        if not job["request"].get("overwrite") and not empty:
            raise TargetExistsError(
                f"target: {target.description} already holds files; choose an empty location"
            )
        names = conv.shard_names()
        ctx.store.set_fields(
            job_id, shard_names=names, shards_total=len(names), ledger_total=len(names) + 1,
            bytes_total=conv.ckpt.total_bytes, adapter=conv.adapter.name, fresh_target="1" if empty else "0",
        )  # fmt: skip
        ctx.store.progress(job_id, step=f"converting {len(names)} shards")
        if not ctx.store.shard_done(job_id, METADATA):  # first: a second worker takes the first shard
            ctx.enqueue_metadata(job_id)
        for name in names:
            if not ctx.store.shard_done(job_id, name):
                ctx.enqueue_shard(job_id, name)

    guarded(ctx, job_id, "plan", body)


def run_shard(ctx: Context, job_id: str, name: str, worker: str | None = None) -> None:
    """Convert one output shard, verify it in flight and stage it with the target; the ledger entry
    carries its SHA-256, the target's receipt and its per-tensor verification for finalize. ``worker``
    (the Celery worker's name) reports what it is doing to the Workers page (``core.fleet``)."""
    fleet = Fleet(ctx.store.r)
    converted = False

    def body(job: dict[str, Any]) -> None:
        nonlocal converted
        if _recorded(ctx, job, name):
            return
        conv = _conversion(ctx, job)
        target = _target(ctx, job)
        started = time.monotonic()
        pending = {"bytes": 0, "at": started, "total": 0}
        device, wall_started = _device(conv), time.time()
        if worker:
            fleet.working(worker, os.getpid(), job_id, name, wall_started, 0, device)

        def progress(p: dict[str, Any]) -> None:
            pending["bytes"] += p.get("bytes_in", 0)
            pending["total"] += p.get("bytes_in", 0)
            if time.monotonic() - pending["at"] >= PROGRESS_EVERY_S:
                _check_cancel(ctx, job_id)
                ctx.store.progress(job_id, step=f"converting {name}", bytes_in=pending["bytes"])
                if worker:
                    fleet.working(worker, os.getpid(), job_id, name, wall_started, pending["total"], device)
                pending.update(bytes=0, at=time.monotonic())

        checks = conv.new_checks() if conv.opts.verify else None
        directory = target.local_dir() or _scratch(ctx, job_id, "shard")
        size = conv.planned_size(name)
        with staging(target, name, size) as staged:
            path = conv.write_shard(name, directory, progress, checks, staged.sink)
            sha = conv.hashes[name]
            if checks is not None and checks.failed:
                path.unlink(missing_ok=True)
                metrics.count(ctx.store.r, "verification_failures")
                bad = "; ".join(f"{k}: {checks.acc(k).detail}" for k in checks.failed[:3])
                raise VerificationError(f"verification failed in {name}: {bad}; nothing was published")
            _check_cancel(ctx, job_id)
            receipt = staged.stage(path, sha)
        complete = ctx.store.progress(
            job_id, step=f"converted {name}", bytes_in=pending["bytes"], shard=name, sha256=sha, size=size,
            receipt=receipt, verification=checks.export() if checks is not None else None,
        )  # fmt: skip
        converted = True
        metrics.record_shard(ctx.store.r, time.monotonic() - started, pending["total"], size)
        if complete:
            ctx.enqueue_finalize(job_id)

    try:
        guarded(ctx, job_id, f"shard {name}", body)
    finally:
        if worker:
            fleet.idle(worker, os.getpid(), converted)


def _device(conv: Conversion) -> str:
    """What the Workers page shows for the device converting: the GPU's name, or ``cpu``."""
    if conv.dev.type == "cuda":
        return f"{conv.dev} · {torch.cuda.get_device_name(conv.dev)}"
    return "cpu"


def write_metadata(ctx: Context, job_id: str, worker: str | None = None) -> None:
    """Write and stage the metadata files the plan fixes, and check the kept scales against the source,
    beside the shards: the source reads they need (the scales, carried files) are then off finalize's path.
    The ledger entry carries each file's SHA-256, size and receipt, and the scales' checks. ``worker``
    shows the unit on the Workers page, as ``metadata``."""
    fleet = Fleet(ctx.store.r)

    def body(job: dict[str, Any]) -> None:
        if _recorded(ctx, job, METADATA):
            return
        conv = _conversion(ctx, job)
        target = _target(ctx, job)
        if worker:
            fleet.working(worker, os.getpid(), job_id, "metadata", time.time(), 0, _device(conv))
        meta = _scratch(ctx, job_id, "meta")
        names = conv.write_fixed_metadata(meta)
        card = model_card.card_plan(target, meta, names, bool(job["request"].get("overwrite")))
        # decided here, beside the other reads, so that finalize reads nothing from the target
        checks = conv.new_checks() if conv.opts.verify else None
        if checks is not None:
            conv.check_kept_scales(checks, meta)
        _check_cancel(ctx, job_id)
        files = _stage_metadata(target, meta, names)
        complete = ctx.store.progress(
            job_id, shard=METADATA, is_shard=False, files=files, card=card,
            verification=checks.export() if checks is not None else None,
        )  # fmt: skip
        shutil.rmtree(meta, ignore_errors=True)
        if complete:
            ctx.enqueue_finalize(job_id)

    try:
        guarded(ctx, job_id, "metadata", body)
    finally:
        if worker:
            fleet.idle(worker, os.getpid(), converted=False)


def finalize(ctx: Context, job_id: str) -> None:
    """Merge the ledger into the report, write recast.json and SHA256SUMS, publish: O(metadata).

    Every shard was verified and hashed by the task that wrote it, and the other metadata files were
    written, staged and checked by their own unit; finalize checks the ledger is complete and consistent
    with the plan (each shard at its planned size, every source tensor checked in full, the kept scales
    included), and publishes only if all of it passed. It reads nothing from the source or the target.
    """

    def body(job: dict[str, Any]) -> None:
        conv = _conversion(ctx, job)
        target = _target(ctx, job)
        ledger = ctx.store.ledger(job_id)
        missing = [n for n in [*conv.shard_names(), METADATA] if n not in ledger]
        if missing:
            raise RecastError(f"internal: finalize found {missing[:3]} not done")
        ctx.store.transition(job_id, ACTIVE, "verifying", step="writing recast.json")
        shards = {n: e for n, e in ledger.items() if n != METADATA}
        report = conv.new_report()
        if conv.opts.verify:
            checks = conv.new_checks()
            for entry in ledger.values():
                checks.load(entry.get("verification") or {})
            conv.settle(checks, report, {n: e["size"] for n, e in shards.items()})
        report.bytes_in = conv.ckpt.total_bytes
        report.bytes_out = conv.layout.total_bytes()
        report.seconds = time.time() - float(job.get("started_at") or job["created_at"])
        _check_cancel(ctx, job_id)
        meta = _scratch(ctx, job_id, "record")
        conv.write_record(meta)
        files = {n: e["sha256"] for n, e in shards.items()} | {
            n: f["sha256"] for n, f in ledger[METADATA]["files"].items()
        }
        names = finish_sidecar(meta, report, files)
        report_json = report.to_json()
        ctx.store.save_report(job_id, report_json)
        if conv.opts.verify and not report.passed:
            metrics.count(ctx.store.r, "verification_failures")
            raise VerificationError(f"verification failed: {report.failure_summary()}; nothing was published")
        card = ledger[METADATA].get("card")
        if card is not None and card["write"]:
            (meta / model_card.CARD).write_text(_card(ctx, job, conv, report_json, meta, card["original"]))
            names.append(model_card.CARD)
        staged = _receipts(ledger) | {
            n: f["receipt"] for n, f in _stage_metadata(target, meta, names).items()
        }
        ctx.store.transition(job_id, ("verifying", "uploading"), "uploading", step="publishing")
        req = job["request"]
        result = target.publish(
            staged,
            req.get("commit_message") or f"Recast: {report.direction} conversion with {report.adapter}",
            bool(req.get("create_pr")),
            bool(req.get("overwrite")),
        )
        if card is not None:
            result["model_card"] = card["write"]
        ctx.store.transition(
            job_id, ("uploading",), "succeeded", step="done", result=result, bytes_in=conv.ckpt.total_bytes
        )
        shutil.rmtree(ctx.settings.stores.scratch / job_id, ignore_errors=True)
        _plans.pop(job_id, None)

    guarded(ctx, job_id, "finalize", body)


def _card(
    ctx: Context,
    job: dict[str, Any],
    conv: Conversion,
    report: dict[str, Any],
    meta: Path,
    original: str | None,
) -> str:
    req = job["request"]
    return model_card.render(
        source=parse_location(req["source"], "source", ctx.settings.stores),
        source_revision=job.get("source_revision") or None,
        target_repo=parse_location(req["target"], "target", ctx.settings.stores).root,
        hub_endpoint=ctx.settings.stores.hf_endpoint,
        report=report,
        source_config=conv.ckpt.config,
        output_config=conv.direction.config,
        manifest=(meta / MANIFEST).read_text(),
        job_id=job["id"],
        original=original,
        output_keys=conv.direction.layout.where,
    )
