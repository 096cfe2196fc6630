"""Jobs: submit, list, read, cancel, report, and follow as server-sent events."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from core.jobstore import Conflict, JobStore, decode
from core.states import TERMINAL
from service.deps import SIGNED_IN, UNAUTHORIZED, JobRecord, ServicesDep
from service.problems import HTTPProblem, declared
from service.schemas import MAX_LABEL_VALUE, Job, JobPage, JobReport, JobRequest, JobState, JobThroughput
from service.submission import create_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=SIGNED_IN, responses=UNAUTHORIZED)

NOT_FOUND = {404: ("job_not_found",), 422: ("invalid_request",)}
_LABEL_QUERY = 63 + 1 + MAX_LABEL_VALUE  # key=value
# What a submission can be refused for; schedule firings record the same codes.
SUBMIT_PROBLEMS = {
    404: ("job_not_found",),
    409: ("target_not_empty", "target_busy", "idempotency_key_in_flight"),
    422: ("invalid_request", "invalid_location", "credential_unknown", "credential_invalid", "adapter_unknown",
          "source_not_found", "source_inaccessible", "not_a_checkpoint", "target_inaccessible",
          "idempotency_key_reused"),
    503: ("storage_unavailable", "queue_unavailable", "credentials_unavailable"),
}  # fmt: skip


@router.post("", status_code=202, responses=declared(SUBMIT_PROBLEMS))
def submit_job(
    body: JobRequest,
    response: Response,
    svc: ServicesDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> Job:
    """Queue a conversion, after checking it can work. The same ``Idempotency-Key`` with the same body
    returns the same job."""
    digest = hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True).encode()).hexdigest()
    if idempotency_key is not None:
        bound = svc.store.claim_idempotency(idempotency_key, digest, "pending")
        if bound is not None:
            job_id, bound_digest = bound
            if bound_digest != digest:
                raise HTTPProblem(422, "idempotency_key_reused", "this Idempotency-Key was used with a different "
                                  "request body; use a new key")  # fmt: skip
            if job_id == "pending":
                raise HTTPProblem(409, "idempotency_key_in_flight", "a request with this Idempotency-Key is "
                                  "still being accepted; retry in a moment", {"Retry-After": "1"})  # fmt: skip
            rec = svc.store.get(job_id)
            if rec is None:
                raise HTTPProblem(404, "job_not_found", f"the job {job_id!r} of this Idempotency-Key expired")
            response.headers["Location"] = f"/v1/jobs/{job_id}"
            return Job.of(rec)
    try:
        rec = create_job(svc.store, svc.settings, svc.send_task, body)
    except BaseException:
        if idempotency_key is not None:
            svc.store.release_idempotency(idempotency_key)
        raise
    if idempotency_key is not None:
        svc.store.claim_idempotency(idempotency_key, digest, rec["id"], replace=True)
    response.headers["Location"] = f"/v1/jobs/{rec['id']}"
    return Job.of(rec)


@router.get("", responses=declared({422: ("invalid_request",)}))
def list_jobs(
    svc: ServicesDep,
    state: JobState | None = None,
    label: Annotated[
        str | None, Query(pattern=r"^[^=]+=", max_length=_LABEL_QUERY, description="key=value")
    ] = None,
    cursor: Annotated[
        str | None, Query(max_length=64, description="next_cursor of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    """Newest first. Pass ``next_cursor`` back as ``cursor`` for the next page."""
    pair = tuple(label.split("=", 1)) if label is not None else None
    page, nxt = svc.store.list(state, pair, cursor, limit)
    return JobPage(jobs=[Job.of(r) for r in page], next_cursor=nxt)


@router.get("/{job_id}", responses=declared(NOT_FOUND))
def get_job(job: JobRecord) -> Job:
    """State, progress, timings, the pinned source revision, and the error or the result."""
    return Job.of(job)


@router.post("/{job_id}/cancel", status_code=202,
             responses=declared({**NOT_FOUND, 409: ("not_cancellable",)}))  # fmt: skip
def cancel_job(job: JobRecord, svc: ServicesDep) -> Job:
    """A queued job is cancelled at once; a running one at the next work unit, its output removed."""
    job_id = job["id"]
    try:
        if job["state"] == "queued":
            svc.store.transition(job_id, ("queued",), "cancelled", step="cancelled")
        else:
            svc.store.transition(job_id, ("running", "verifying"), "cancelling", step="cancelling")
    except Conflict as exc:
        if exc.state not in ("cancelling", "cancelled"):
            raise HTTPProblem(409, "not_cancellable", f"job {job_id} is {exc.state}; only queued, running or "
                              "verifying jobs can be cancelled") from None  # fmt: skip
    return Job.of(svc.store.get(job_id) or job)


@router.get(
    "/{job_id}/report",
    responses=declared({404: ("job_not_found", "report_not_ready"), 422: ("invalid_request",)}),
)
def get_job_report(job: JobRecord, svc: ServicesDep) -> JobReport:
    """Verification results per tensor and the accounting of every source key."""
    got = svc.store.report(job["id"])
    if got is None:
        raise HTTPProblem(404, "report_not_ready", f"job {job['id']} is {job['state']}; the report is written "
                          "after verification")  # fmt: skip
    return JobReport(got)


@router.get("/{job_id}/throughput", responses=declared(NOT_FOUND))
def get_job_throughput(job: JobRecord, svc: ServicesDep) -> JobThroughput:
    """Source bytes read over time, all workers together, with the rate between samples."""
    return JobThroughput.of(svc.store.throughput(job["id"]))


@router.get("/{job_id}/events", response_class=EventSourceResponse, responses=declared(NOT_FOUND))
async def job_events(
    job: JobRecord,
    svc: ServicesDep,
    last_event_id: Annotated[str | None, Header(pattern=r"^\d+(-\d+)?$", max_length=64)] = None,
) -> AsyncIterator[Job]:
    """Server-sent events: every state change and progress update, each with the job as it then was.

    Resumable with ``Last-Event-ID``. The stream ends after the job's last state event, at once when a
    finished job has nothing after ``Last-Event-ID``, and when the job expires or is deleted.
    """
    # Annotated with Job, so the schema says what each event's data is; the ServerSentEvents yielded,
    # which add the id and the type, FastAPI sends as they are (and pings while none comes for 15 s).
    key, events = JobStore.key(job["id"]), JobStore.key(job["id"], "events")
    after = last_event_id or "0"
    while True:
        # A state is written together with its event (one script), so once a finished state is seen,
        # one read without waiting returns every event left.
        state = await svc.events.hget(key, "state")
        if state is None:
            return
        finished = state in TERMINAL
        got = await svc.events.xread({events: after}, count=100, block=None if finished else 1000)
        if not got and finished:
            return
        for _, entries in got or []:
            for entry_id, fields in entries:
                after = entry_id
                now = Job.of(decode(json.loads(fields["data"])))
                yield ServerSentEvent(data=now, event=fields["type"], id=entry_id)
                if fields["type"] == "state" and now.state in TERMINAL:
                    return
