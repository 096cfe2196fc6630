"""Creating a job: shared by ``POST /v1/jobs`` and schedule firings, so both check, pin and queue alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.jobstore import JobStore
from service.problems import Problem
from service.schemas import JobRequest
from service.settings import Settings
from worker.stores import Location, parse_location, pin_revision

SendTask = Callable[[str, list[str]], Any]


def check_locations(body: JobRequest, settings: Settings) -> Location:
    """Parse both locations (errors name the field); returns the source."""
    src = parse_location(body.source, "source", settings.stores)
    dst = parse_location(body.target, "target", settings.stores)
    if dst.scheme == "hf" and dst.revision:
        raise Problem(422, "invalid_request", "target: an hf:// target takes no @revision; "
                      "use create_pr to propose the change")  # fmt: skip
    return src


def create_job(store: JobStore, settings: Settings, send_task: SendTask, body: JobRequest) -> dict[str, Any]:
    """Pin the source revision, record the job and queue its planning task."""
    src = check_locations(body, settings)
    pinned = pin_revision(src, settings.stores, body.source_credential)
    rec = store.create(body.model_dump(exclude={"labels"}), body.labels, pinned.revision)
    store.set_fields(rec["id"], source_pinned=pinned.url)
    try:
        send_task("recast.plan", [rec["id"]])
        store.mark_enqueued(rec["id"])
    except Exception as exc:
        store.transition(rec["id"], ("queued",), "failed", error_code="queue_unavailable",
                         error_message=f"could not queue the job: {type(exc).__name__}")  # fmt: skip
        raise Problem(503, "queue_unavailable", "the job queue is unreachable; try again shortly") from exc
    return store.get(rec["id"]) or rec
