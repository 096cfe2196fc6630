"""The /v1 HTTP API: submit, list, follow, cancel and inspect conversion jobs.

A thin layer: it validates a request, pins the source revision, writes the job record and queues the
planning task. Everything a job does happens on the workers, reported back through the job store.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis
import redis.asyncio as aredis
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline

from service import problems
from service.dashboard import install as install_dashboard
from service.jobstore import STATES, TERMINAL, Conflict, JobStore, decode
from service.metrics import Metrics, alive_workers
from service.problems import Problem
from service.schedules import ScheduleStore
from service.schemas import Adapter, InspectRequest, Job, JobPage, JobRequest, SchedulePatch, ScheduleRequest
from service.settings import Settings
from service.submission import check_locations, create_job
from worker.engine.adapters import ADAPTERS
from worker.engine.errors import RecastError
from worker.engine.inspect import inspect
from worker.stores import open_source, parse_location, pin_revision

log = logging.getLogger("recast.api")
KEEPALIVE_S = 15
SESSION_COOKIE = "recast_session"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    if not settings.api_tokens:
        raise RecastError("RECAST_API_TOKENS is empty: set at least one token (comma-separated)")
    store = JobStore.from_settings(settings)
    events = aredis.Redis.from_url(settings.required_redis_url(), decode_responses=True)
    metrics = Metrics(store)
    from worker.celery_app import make_app

    celery = make_app(settings)

    def send_task(name: str, args: list[str]) -> None:
        celery.send_task(name, args=args)
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await events.aclose()

    app = FastAPIOffline(  # /docs and /redoc with their scripts served from the package, not a CDN
        lifespan=lifespan,
        title="Recast",
        version="1",
        description="Checkpoint conversion jobs: FP8 safetensors to and from the NeMo AutoModel native layout, "
        "verified bit for bit.",
    )
    problems.install(app)
    bearer = HTTPBearer(auto_error=False)
    tokens = [t.encode() for t in settings.api_tokens]

    def valid_token(given: str | None) -> bool:
        ok = False
        for t in tokens:  # every token is compared, so timing says nothing about which one nearly matched
            ok |= hmac.compare_digest((given or "").encode(), t)
        return ok

    def authorized(
        request: Request,
        creds: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        """A bearer token, or the dashboard's session cookie (a browser's EventSource sends no headers)."""
        if not valid_token(creds.credentials if creds else request.cookies.get(SESSION_COOKIE)):
            raise Problem(401, "unauthorized", "a valid bearer token is required (Authorization: Bearer …)",
                          {"WWW-Authenticate": "Bearer"})  # fmt: skip

    auth = [Depends(authorized)]
    install_dashboard(app, valid_token=valid_token, cookie=SESSION_COOKIE)

    @app.middleware("http")
    async def _timing(request: Request, call_next):
        started = time.perf_counter()
        resp = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(request.method, getattr(route, "path", "other"), resp.status_code).observe(
            time.perf_counter() - started
        )
        return resp

    def job_or_404(job_id: str) -> dict[str, Any]:
        rec = store.get(job_id)
        if rec is None:
            raise Problem(404, "job_not_found", f"no job {job_id!r} (finished jobs expire after "
                          f"{settings.job_ttl_s // 3600} h)")  # fmt: skip
        return rec

    @app.post("/v1/jobs", status_code=202, response_model=Job, dependencies=auth, tags=["jobs"])
    def submit(
        body: JobRequest, response: Response, idempotency_key: Annotated[str | None, Header()] = None
    ) -> Job:
        """Queue a conversion. The same ``Idempotency-Key`` with the same body returns the same job."""
        check_locations(body, settings)
        digest = hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True).encode()).hexdigest()
        if idempotency_key is not None:
            if not 0 < len(idempotency_key) <= 200:
                raise Problem(422, "invalid_request", "Idempotency-Key must be 1-200 characters")
            bound = store.claim_idempotency(idempotency_key, digest, "pending")
            if bound is not None:
                return _replay(bound, digest, response)
        try:
            rec = create_job(store, settings, send_task, body)
        except BaseException:
            if idempotency_key is not None:
                store.release_idempotency(idempotency_key)
            raise
        if idempotency_key is not None:
            store.claim_idempotency(idempotency_key, digest, rec["id"], replace=True)
        response.headers["Location"] = f"/v1/jobs/{rec['id']}"
        return Job.of(rec)

    def _replay(bound: tuple[str, str], digest: str, response: Response) -> Job:
        job_id, bound_digest = bound
        if bound_digest != digest:
            raise Problem(422, "idempotency_key_reused",
                          "this Idempotency-Key was used with a different request body; use a new key")  # fmt: skip
        if job_id == "pending":
            raise Problem(409, "idempotency_key_in_flight", "a request with this Idempotency-Key is still being "
                          "accepted; retry in a moment", {"Retry-After": "1"})  # fmt: skip
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        return Job.of(job_or_404(job_id))

    @app.get("/v1/jobs", response_model=JobPage, dependencies=auth, tags=["jobs"])
    def list_jobs(
        state: Annotated[str | None, Query(description="one of " + ", ".join(STATES))] = None,
        label: Annotated[str | None, Query(description="key=value")] = None,
        cursor: str | None = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> JobPage:
        """Newest first. Pass ``next_cursor`` back as ``cursor`` for the next page."""
        if state is not None and state not in STATES:
            raise Problem(422, "invalid_request", f"state: must be one of {', '.join(STATES)}")
        pair = None
        if label is not None:
            if "=" not in label:
                raise Problem(422, "invalid_request", "label: expected key=value")
            k, v = label.split("=", 1)
            pair = (k, v)
        page, nxt = store.list(state, pair, cursor, limit)
        return JobPage(jobs=[Job.of(r) for r in page], next_cursor=nxt)

    @app.get("/v1/jobs/{job_id}", response_model=Job, dependencies=auth, tags=["jobs"])
    def get_job(job_id: str) -> Job:
        return Job.of(job_or_404(job_id))

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202, response_model=Job, dependencies=auth, tags=["jobs"])
    def cancel(job_id: str) -> Job:
        """A queued job is cancelled at once; a running one at the next work unit, its output removed."""
        rec = job_or_404(job_id)
        try:
            if rec["state"] == "queued":
                store.transition(job_id, ("queued",), "cancelled", step="cancelled")
            else:
                store.transition(job_id, ("running", "verifying"), "cancelling", step="cancelling")
        except Conflict as exc:
            if exc.state in ("cancelling", "cancelled"):
                return Job.of(job_or_404(job_id))
            raise Problem(409, "not_cancellable", f"job {job_id} is {exc.state}; only queued, running or "
                          "verifying jobs can be cancelled") from None  # fmt: skip
        return Job.of(job_or_404(job_id))

    @app.get("/v1/jobs/{job_id}/report", dependencies=auth, tags=["jobs"])
    def report(job_id: str) -> dict[str, Any]:
        """Verification results per tensor and the accounting of every source key."""
        rec = job_or_404(job_id)
        got = store.report(job_id)
        if got is None:
            raise Problem(404, "report_not_ready", f"job {job_id} is {rec['state']}; the report is written "
                          "after verification")  # fmt: skip
        return got

    @app.get(
        "/v1/jobs/{job_id}/events",
        dependencies=auth,
        tags=["jobs"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def job_events(
        job_id: str, request: Request, last_event_id: Annotated[str | None, Header()] = None
    ) -> StreamingResponse:
        """Server-sent events: every state change and progress update; resumable with ``Last-Event-ID``."""
        await run_in_threadpool(job_or_404, job_id)
        return StreamingResponse(
            _stream(job_id, last_event_id or "0", request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream(job_id: str, after: str, request: Request) -> AsyncIterator[str]:
        key = JobStore.key(job_id, "events")
        idle = time.monotonic()
        while not await request.is_disconnected():
            got = await events.xread({key: after}, count=100, block=1000)
            if not got:
                if time.monotonic() - idle > KEEPALIVE_S:
                    idle = time.monotonic()
                    yield ": keepalive\n\n"
                if await events.exists(JobStore.key(job_id)) == 0:
                    return
                continue
            for _, entries in got:
                for entry_id, fields in entries:
                    after = entry_id
                    job = Job.of(decode(json.loads(fields["data"])))
                    yield f"id: {entry_id}\nevent: {fields['type']}\ndata: {job.model_dump_json()}\n\n"
                    if fields["type"] == "state" and job.state in TERMINAL:
                        return
            idle = time.monotonic()

    @app.post("/v1/inspect", dependencies=auth, tags=["checkpoints"])
    def inspect_source(body: InspectRequest) -> dict[str, Any]:
        """Preflight: what the checkpoint is and what converting it would need, from headers only."""
        loc = pin_revision(parse_location(body.source, "source", settings.stores), settings.stores,
                           body.source_credential)  # fmt: skip
        info = inspect(open_source(loc, settings.stores, body.source_credential), body.adapter, body.dtype)
        info["source"] = loc.url
        return info

    @app.get("/v1/adapters", response_model=list[Adapter], dependencies=auth, tags=["checkpoints"])
    def adapters() -> list[Adapter]:
        return [Adapter(name=a.name, description=a.description, architectures=list(a.architectures))
                for a in ADAPTERS.values()]  # fmt: skip

    schedules = ScheduleStore(store, celery)

    def schedule_or_404(sid: str) -> dict[str, Any]:
        rec = schedules.get_raw(sid)
        if rec is None:
            raise Problem(404, "schedule_not_found", f"no schedule {sid!r}")
        return rec

    @app.post("/v1/schedules", status_code=201, dependencies=auth, tags=["schedules"])
    def create_schedule(body: ScheduleRequest, response: Response) -> dict[str, Any]:
        """Each firing converts the newest checkpoint the template's source finds, once per revision."""
        parse_location(body.template.source, "template.source", settings.stores)
        parse_location(body.template.target.format(name="x", revision="x"), "template.target", settings.stores)
        rec = schedules.create(body.name, body.cron, body.template, body.paused)
        response.headers["Location"] = f"/v1/schedules/{rec['id']}"
        return rec

    @app.get("/v1/schedules", dependencies=auth, tags=["schedules"])
    def list_schedules() -> dict[str, Any]:
        return {"schedules": schedules.list()}

    @app.get("/v1/schedules/{sid}", dependencies=auth, tags=["schedules"])
    def get_schedule(sid: str) -> dict[str, Any]:
        return schedules.view(schedule_or_404(sid))

    @app.patch("/v1/schedules/{sid}", dependencies=auth, tags=["schedules"])
    def patch_schedule(sid: str, body: SchedulePatch) -> dict[str, Any]:
        """Pause or resume (``{"paused": true}``), or change the name, cron or template."""
        schedule_or_404(sid)
        changes = body.model_dump(exclude_unset=True)
        if "template" in changes:
            changes["template"] = body.template.model_dump() if body.template else None
        return schedules.update(sid, changes) or schedules.view(schedule_or_404(sid))

    @app.delete("/v1/schedules/{sid}", status_code=204, dependencies=auth, tags=["schedules"])
    def delete_schedule(sid: str) -> Response:
        if not schedules.delete(sid):
            raise Problem(404, "schedule_not_found", f"no schedule {sid!r}")
        return Response(status_code=204)

    @app.get("/v1/schedules/{sid}/firings", dependencies=auth, tags=["schedules"])
    def schedule_firings(sid: str) -> dict[str, Any]:
        """Newest first: when, which source revision, the job it submitted or why it skipped."""
        schedule_or_404(sid)
        return {"firings": schedules.firings(sid)}

    @app.post("/v1/schedules/{sid}/run", status_code=202, dependencies=auth, tags=["schedules"])
    def run_schedule(sid: str) -> dict[str, Any]:
        """Fire now, as the beat would (also when paused)."""
        schedule_or_404(sid)
        return schedules.fire(sid, settings, send_task, manual=True) or {}

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(response: Response) -> dict[str, Any]:
        """Ready when Redis answers and at least one worker sent a heartbeat in the last 30 s."""
        checks: dict[str, Any] = {}
        try:
            store.r.ping()
            checks["redis"] = "ok"
            n = alive_workers(store)
            checks["workers"] = n
        except redis.RedisError as exc:
            checks["redis"] = f"unreachable: {type(exc).__name__}"
            n = 0
        ready = checks["redis"] == "ok" and n > 0
        response.status_code = 200 if ready else 503
        return {"status": "ready" if ready else "not ready", "checks": checks}

    @app.get("/metrics", tags=["health"])
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
