"""Checking and creating a job, shared by ``POST /v1/jobs`` (which the dashboard's form posts to) and
schedule firings, so all of them refuse the same requests with the same problem codes before anything
is queued: a request that cannot work is answered at once instead of failing on a worker minutes later.

First what needs no store: both locations parse, credentials are names configured on this server, the
adapter exists. Then the stores, under one deadline (``RECAST_SUBMIT_CHECK_S``): the source revision is
pinned, the source holds a checkpoint (``config.json`` and an index, or one shard whose header reads)
and the target is empty unless ``overwrite`` is set. A store that does not answer in time leaves that
check to the worker, which makes it again when it plans the job; only the pin must finish, since the
job records the revision it converts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from core.jobstore import JobStore
from core.settings import Settings
from service.problems import HTTPProblem, recoded
from service.schemas import JobRequest, ScheduleTemplate
from worker.engine.adapters import ADAPTERS
from worker.engine.checkpoint import INDEX, SINGLE
from worker.engine.errors import CheckpointError, RecastError
from worker.engine.safetensors_io import parse_header
from worker.engine.storage import read_all
from worker.stores import Location, StoreSettings, open_source, open_target, parse_location, pin_revision

SendTask = Callable[[str, list[str]], Any]
log = logging.getLogger("recast.submission")

# Store checks run here, so the request thread can stop waiting for one that hangs; the check itself
# ends on the store client's own timeouts.
_checks = ThreadPoolExecutor(max_workers=8, thread_name_prefix="recast-check")
_CHECK_JOB_ID = "submit-check"  # opening a target needs a job id for its staging area; checks stage nothing


def parse(url: str, field: str, settings: Settings) -> Location:
    """The location ``url`` given for ``field``; the stores' parse errors name the field already."""
    with recoded({RecastError: "invalid_location"}):
        return parse_location(url, field, settings.stores)


def check_adapter(name: str | None, field: str = "adapter") -> None:
    """A named adapter must exist; a typo would otherwise fail the job only when a worker plans it."""
    if name is not None and name not in ADAPTERS:
        raise HTTPProblem(422, "adapter_unknown", f"{field}: no adapter of that name; GET /v1/adapters lists "
                          f"them ({', '.join(ADAPTERS)})", allowed=list(ADAPTERS))  # fmt: skip


def check_credential(name: str | None, field: str, loc: Location, settings: Settings) -> None:
    """Only names configured on the server are accepted. The value is never repeated: whatever was
    given may be the secret itself, pasted where its name belongs."""
    if name is None:
        return
    try:
        configured = settings.credential_names()
    except RecastError as exc:
        raise HTTPProblem(503, "credentials_unavailable", str(exc)) from None
    if name not in configured:
        listed = ", ".join(configured) if configured else "none (RECAST_CREDENTIALS_FILE is not set)"
        raise HTTPProblem(422, "credential_unknown", f"{field}: not the name of a credential configured on this "
                          f"server; configured: {listed}", allowed=configured)  # fmt: skip
    if loc.scheme in ("s3", "hf"):
        with recoded({RecastError: "credential_invalid"}):
            settings.stores.credential(name, loc.scheme)


def pin_source(loc: Location, stores: StoreSettings, credential: str | None) -> Location:
    """The source at the commit its revision names now (hf); other stores' sources come back as they are."""
    with recoded({CheckpointError: "source_not_found", RecastError: "source_inaccessible"}, "source"):
        return pin_revision(loc, stores, credential)


def check_source(loc: Location, stores: StoreSettings, credential: str | None) -> None:
    """The source is there, and holds config.json plus an index, or a single shard whose header reads."""
    with recoded({CheckpointError: "source_not_found", RecastError: "source_inaccessible"}, "source"):
        source = open_source(loc, stores, credential)
        present = {n for n in ("config.json", INDEX, SINGLE) if source.exists(n)}
        if not present and not source.list():
            raise CheckpointError(f"{loc.url}: nothing is there")
    with recoded({CheckpointError: "not_a_checkpoint", RecastError: "source_inaccessible"}, "source"):
        if "config.json" not in present:
            raise CheckpointError(
                f"{loc.url}: no config.json; a checkpoint is a Hugging Face style directory"
            )
        if INDEX in present:
            try:
                weight_map = json.loads(read_all(source, INDEX)).get("weight_map")
            except (ValueError, AttributeError):
                raise CheckpointError(f"{loc.url}/{INDEX}: not a JSON object") from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{loc.url}/{INDEX}: missing or empty 'weight_map'")
            if missing := sorted(n for n in set(map(str, weight_map.values())) if not source.exists(n)):
                raise CheckpointError(
                    f"{loc.url}/{INDEX}: names shards that do not exist: {', '.join(missing[:3])}"
                )
        elif SINGLE in present:
            parse_header(source, SINGLE)
        else:
            raise CheckpointError(f"{loc.url}: neither {INDEX} nor {SINGLE}")


def check_target(loc: Location, stores: StoreSettings, credential: str | None) -> None:
    """The target holds nothing yet: a job publishes over a checkpoint only when asked to (``overwrite``)."""
    with recoded({RecastError: "target_inaccessible"}, "target"):
        empty = open_target(loc, stores, _CHECK_JOB_ID, credential).is_empty()
    if not empty:
        raise HTTPProblem(409, "target_not_empty", f"target: {loc.url} already holds files; choose an empty "
                          "location, or set overwrite to replace them")  # fmt: skip


def _settled(future: Future[Any], deadline: float, what: str) -> bool:
    """Wait for a store check until ``deadline``; False if it is still running (its error, if any, raises)."""
    try:
        future.result(timeout=max(deadline - time.monotonic(), 0))
    except TimeoutError:
        future.cancel()
        log.info("%s did not answer in time; the worker checks it when it plans the job", what)
        return False
    return True


def check_job(body: JobRequest, settings: Settings) -> Location:
    """Refuse what cannot work; returns the source pinned to the revision the job converts."""
    src = parse(body.source, "source", settings)
    dst = parse(body.target, "target", settings)
    if dst.scheme == "hf" and dst.revision:
        raise HTTPProblem(422, "invalid_location", "target: an hf:// target takes no @revision; "
                          "use create_pr to propose the change")  # fmt: skip
    check_credential(body.source_credential, "source_credential", src, settings)
    check_credential(body.target_credential, "target_credential", dst, settings)
    check_adapter(body.adapter)
    deadline = time.monotonic() + settings.check_timeout_s
    target = (
        None if body.overwrite else _checks.submit(check_target, dst, settings.stores, body.target_credential)
    )
    pin = _checks.submit(pin_source, src, settings.stores, body.source_credential)
    if not _settled(pin, deadline, f"pinning {src.url}"):
        raise HTTPProblem(503, "storage_unavailable", f"source: {src.url}: the store did not answer within "
                          f"{settings.check_timeout_s:g} s; try again shortly", {"Retry-After": "10"})  # fmt: skip
    pinned = pin.result()
    _settled(_checks.submit(check_source, pinned, settings.stores, body.source_credential), deadline, src.url)
    if target is not None:
        _settled(target, deadline, dst.url)
    return pinned


def check_template(tpl: ScheduleTemplate, settings: Settings) -> None:
    """What a schedule can be checked for before it fires: its source may not hold a checkpoint yet, so
    the stores are checked at each firing, as for any job."""
    src = parse(tpl.source, "template.source", settings)
    dst = parse(tpl.target.format(name="x", revision="x"), "template.target", settings)
    check_credential(tpl.source_credential, "template.source_credential", src, settings)
    check_credential(tpl.target_credential, "template.target_credential", dst, settings)
    check_adapter(tpl.adapter, "template.adapter")


def create_job(store: JobStore, settings: Settings, send_task: SendTask, body: JobRequest) -> dict[str, Any]:
    """Check the request, record the job with its pinned source and queue its planning task.

    A target is claimed by its canonical URL (``target_claim``: no trailing or doubled slash, no
    ``localhost``; a Hub repo id in lower case, as the Hub matches them), so two spellings of one
    location are one target."""
    dst = parse(body.target, "target", settings)
    claim = dst.url.lower() if dst.scheme == "hf" else dst.url
    if other := store.target_holder(claim):  # the worker claims the target when it plans
        raise HTTPProblem(409, "target_busy", f"target: {body.target} is being written by job {other}; wait "
                          "for it to end or cancel it, then submit again")  # fmt: skip
    pinned = check_job(body, settings)
    rec = store.create(body.model_dump(exclude={"labels"}), body.labels, pinned.revision)
    store.set_fields(rec["id"], source_pinned=pinned.url, target_claim=claim)
    try:
        send_task("recast.plan", [rec["id"]])
        store.mark_enqueued(rec["id"])
    except Exception as exc:
        store.transition(rec["id"], ("queued",), "failed", error_code="queue_unavailable",
                         error_message=f"could not queue the job: {type(exc).__name__}")  # fmt: skip
        raise HTTPProblem(
            503, "queue_unavailable", "the job queue is unreachable; try again shortly"
        ) from exc
    return store.get(rec["id"]) or rec
