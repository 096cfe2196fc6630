"""The HTTP service: the /v1 API (``service.routes``), the dashboard, health and metrics.

A thin layer: it checks a request, pins the source revision, writes the job record and queues the
planning task. Everything a job does happens on the workers, reported back through the job store.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import redis.asyncio as aredis
from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline

from core.jobstore import JobStore
from core.metrics import Metrics
from core.sessions import Sessions
from core.settings import Settings
from service import problems
from service.dashboard import install as install_dashboard
from service.deps import Services
from service.routes import checkpoints, health, jobs, schedules
from service.schedules import ScheduleStore
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
    for module in (jobs, checkpoints, schedules, health):
        app.include_router(module.router)

    @app.middleware("http")
    async def _timing(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        resp = await call_next(request)
        route = request.scope.get("route")
        services.metrics.requests.labels(
            request.method, getattr(route, "path", "other"), resp.status_code
        ).observe(time.perf_counter() - started)
        return resp

    return app
