"""What the routes depend on, as ``Annotated`` aliases: the service's parts, the signed-in caller, and
the job or schedule a path names (a 404 problem before the route runs, also for an event stream)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

import redis.asyncio as aredis
from celery import Celery
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from core.jobstore import JobStore
from core.metrics import Metrics
from core.settings import Settings
from service.problems import HTTPProblem, declared
from service.schedules import ScheduleStore

SESSION_COOKIE = "recast_session"
# Ids become Redis key components: only plain ones reach the store.
_ID = r"^[A-Za-z0-9_-]{1,64}$"


@dataclass(frozen=True)
class Services:
    """The parts every route shares, built once by ``create_app``."""

    settings: Settings
    store: JobStore
    events: aredis.Redis  # its own async client: event streams block in XREAD without holding a thread
    celery: Celery
    schedules: ScheduleStore
    metrics: Metrics

    def send_task(self, name: str, args: list[str]) -> None:
        self.celery.send_task(name, args=args)

    def valid_token(self, given: str | None) -> bool:
        ok = False
        for t in self.settings.api_tokens:  # all are compared, so timing says nothing about a near match
            ok |= hmac.compare_digest((given or "").encode(), t.encode())
        return ok


def _services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(_services)]
_bearer = HTTPBearer(auto_error=False)


def authorized(
    request: Request,
    svc: ServicesDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """A bearer token, or the dashboard's session cookie (a browser's EventSource sends no headers)."""
    if not svc.valid_token(creds.credentials if creds else request.cookies.get(SESSION_COOKIE)):
        raise HTTPProblem(401, "unauthorized", "a valid bearer token is required (Authorization: Bearer …)",
                          {"WWW-Authenticate": "Bearer"})  # fmt: skip


# For the routers of /v1: every route needs a caller, and may answer 401.
SIGNED_IN = [Depends(authorized)]
UNAUTHORIZED = declared({401: ("unauthorized",)})

JobId = Annotated[str, Path(pattern=_ID, description="a job's id")]
ScheduleId = Annotated[str, Path(pattern=_ID, description="a schedule's id")]


def _job(job_id: JobId, svc: ServicesDep) -> dict[str, Any]:
    rec = svc.store.get(job_id)
    if rec is None:
        raise HTTPProblem(404, "job_not_found", f"no job {job_id!r} (finished jobs expire after "
                          f"{svc.settings.job_ttl_s // 3600} h)")  # fmt: skip
    return rec


def _schedule(schedule_id: ScheduleId, svc: ServicesDep) -> dict[str, Any]:
    rec = svc.schedules.get_raw(schedule_id)
    if rec is None:
        raise HTTPProblem(404, "schedule_not_found", f"no schedule {schedule_id!r}")
    return rec


JobRecord = Annotated[dict[str, Any], Depends(_job)]
ScheduleRecord = Annotated[dict[str, Any], Depends(_schedule)]
