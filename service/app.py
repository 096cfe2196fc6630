"""The HTTP service: the /v1 API (``service.routes``), the dashboard, health and metrics.

A thin layer: it checks a request, pins the source revision, writes the job record and queues the
planning task. Everything a job does happens on the workers, reported back through the job store.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import h11
import redis.asyncio as aredis
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from core.jobstore import JobStore
from core.metrics import Metrics
from core.sessions import Sessions
from core.settings import Settings
from service import problems
from service.dashboard import install as install_dashboard
from service.deps import Services
from service.routes import checkpoints, health, jobs, schedules, workers
from service.schedules import ScheduleStore
from service.schemas import MAX_BODY_BYTES, MAX_HEAD_BYTES
from worker.engine.errors import RecastError


def _operation_id(route: APIRoute) -> str:
    """Operation ids are the handlers' names (``submit_job``): generated clients name methods after them."""
    return route.name


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    if not settings.api_tokens:
        raise RecastError("RECAST_API_TOKENS is empty: set at least one token (comma-separated)")
    from core.queue import make_app

    store = JobStore.from_settings(settings)
    celery = make_app(settings)
    services = Services(
        settings=settings,
        store=store,
        events=aredis.Redis.from_url(settings.required_redis_url(), decode_responses=True),
        celery=celery,
        schedules=ScheduleStore(store, celery),
        metrics=Metrics(store),
        sessions=Sessions(store.r, settings.api_tokens, settings.session_ttl_s),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await services.events.aclose()

    app = FastAPIOffline(  # /docs and /redoc with their scripts served from the package, not a CDN
        lifespan=lifespan,
        title="Recast",
        version="1",
        description="Checkpoint conversion jobs: FP8 safetensors to and from the NeMo AutoModel native layout, "
        "verified bit for bit.",
        generate_unique_id_function=_operation_id,
    )
    app.state.services = services
    problems.install(app)
    install_dashboard(app, services.sessions)
    for module in (jobs, checkpoints, schedules, workers, health):
        app.include_router(module.router, max_body_size=MAX_BODY_BYTES)

    @app.middleware("http")
    async def _timing(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        resp = await call_next(request)
        route = request.scope.get("route")
        services.metrics.requests.labels(
            request.method, getattr(route, "path", "other"), resp.status_code
        ).observe(time.perf_counter() - started)
        return resp

    app.add_middleware(_Limits)  # added last, so outermost: a refused request reaches nothing else
    return app


class _Limits:
    """Refuse a request whose headers or declared body length exceed the limits, as a problem.

    The routers' ``max_body_size`` counts a body as a route reads it, so one sent without Content-Length
    is refused too; but where Content-Length is too large, Starlette answers ``text/plain``, and only
    after a route that never reads the body has run. So a declared length is refused here, before
    anything runs. Headers that arrive in one read pass the HTTP parser whole, so they are counted here
    too (``_H11`` refuses those that arrive in pieces).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = _refusal(Headers(scope=scope)) if scope["type"] == "http" else None
        await (refusal or self.app)(scope, receive, send)


def _refusal(headers: Headers) -> JSONResponse | None:
    if sum(len(name) + len(value) + 4 for name, value in headers.raw) > MAX_HEAD_BYTES:  # "name: value\r\n"
        return _headers_too_large()
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return problems.response(413, "payload_too_large", problems.TOO_LARGE)
    return None


def _headers_too_large() -> JSONResponse:
    return problems.response(431, "headers_too_large", f"the request's headers exceed {MAX_HEAD_BYTES} bytes")


class _H11(H11Protocol):
    """uvicorn answers every malformed request with a plain-text 400; a request whose line and headers
    outgrow ``MAX_HEAD_BYTES`` gets the 431 problem instead, so a client learns what to shorten."""

    def send_400_response(self, msg: str) -> None:
        if len(self.conn.trailing_data[0]) <= MAX_HEAD_BYTES:
            super().send_400_response(msg)
            return
        answer = _headers_too_large()
        head = [*answer.raw_headers, (b"connection", b"close")]
        for event in (
            h11.Response(status_code=431, headers=head),
            h11.Data(data=answer.body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


# How uvicorn serves the API (``recast api``, ``recast up``, the tests): with the h11 parser whatever else is
# installed, its buffer bounding the request head, and the 431 above.
SERVER_OPTIONS: dict[str, Any] = {"http": _H11, "h11_max_incomplete_event_size": MAX_HEAD_BYTES}
