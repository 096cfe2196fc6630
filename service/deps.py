"""What the routes depend on, as ``Annotated`` aliases: the service's parts, the signed-in caller, and
the job or schedule a path names (a 404 problem before the route runs, also for an event stream).

A caller signs in with a bearer token, or with the dashboard's session cookie (``core.sessions``; a
browser's ``EventSource`` cannot send headers). A browser sends that cookie with any request to this
host, whichever page made it, so a request the cookie authenticates may change something (POST, PATCH,
DELETE) only if the browser says it came from this origin (``same_origin``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

import redis.asyncio as aredis
from celery import Celery
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from core.jobstore import JobStore
from core.metrics import Metrics
from core.sessions import Sessions
from core.settings import Settings
from service.problems import HTTPProblem, declared
from service.schedules import ScheduleStore

SESSION_COOKIE = "recast_session"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
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
    sessions: Sessions

    def send_task(self, name: str, args: list[str]) -> None:
        self.celery.send_task(name, args=args)


def same_origin(request: Request, *, unstated: bool) -> bool:
    """Whether the browser says this request came from a page of this origin.

    ``Sec-Fetch-Site`` is the browser's own verdict (a page cannot set it) and holds behind a proxy that
    rewrites ``Host``; where it is absent, ``Origin`` must name the host the browser saw (``Host``, or
    ``X-Forwarded-Host`` behind a proxy). ``same-site`` is refused: another service on this host, on
    another port, gets SameSite=Strict cookies sent along. ``unstated`` answers for a request that has
    neither header, which no current browser sends with a POST, PATCH or DELETE.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")  # "none": the person's own action (typed, bookmarked)
    origin = request.headers.get("origin")
    if origin is None:
        return unstated
    hosts = {request.headers.get("host", "")}
    hosts.update(h.strip() for h in request.headers.get("x-forwarded-host", "").split(","))
    hosts.discard("")
    return urlsplit(origin).netloc in hosts


def _services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(_services)]
_bearer = HTTPBearer(auto_error=False)


def authorized(
    request: Request,
    svc: ServicesDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """A bearer token, or a dashboard session whose unsafe requests come from the dashboard itself."""
    if creds is not None:
        ok = svc.sessions.valid_token(creds.credentials)
    else:
        ok = svc.sessions.check(request.cookies.get(SESSION_COOKIE))
        if ok and request.method not in _SAFE_METHODS and not same_origin(request, unstated=False):
            raise HTTPProblem(403, "cross_site_request", "a request signed in by the dashboard's session "
                              "cookie may change something only from the dashboard's own pages; other "
                              "clients send a bearer token")  # fmt: skip
    if not ok:
        raise HTTPProblem(401, "unauthorized", "a valid bearer token is required (Authorization: Bearer …)",
                          {"WWW-Authenticate": "Bearer"})  # fmt: skip


# For the routers of /v1: every route needs a caller, and may answer 401 (or 403 to a cross-site page).
SIGNED_IN = [Depends(authorized)]
UNAUTHORIZED = declared({401: ("unauthorized",), 403: ("cross_site_request",)})

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
