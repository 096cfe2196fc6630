"""Open endpoints for orchestrators and Prometheus: liveness, readiness, metrics."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse

from core.metrics import alive_workers
from service.deps import ServicesDep
from service.schemas import Health, Readiness, ReadinessChecks

router = APIRouter(tags=["health"])


@router.get("/healthz")
def get_health() -> Health:
    """The process answers."""
    return Health(status="ok")


@router.get(
    "/readyz", responses={503: {"model": Readiness, "description": "Redis or every worker is missing"}}
)
def get_readiness(response: Response, svc: ServicesDep) -> Readiness:
    """Ready when Redis answers and at least one worker sent a heartbeat in the last 30 s."""
    try:
        svc.store.r.ping()
        checks = ReadinessChecks(redis="ok", workers=alive_workers(svc.store))
    except redis.RedisError as exc:
        checks = ReadinessChecks(redis=f"unreachable: {type(exc).__name__}")
    ready = checks.redis == "ok" and checks.workers > 0
    response.status_code = 200 if ready else 503
    return Readiness(status="ready" if ready else "not ready", checks=checks)


@router.get("/metrics", response_class=PlainTextResponse)
def get_metrics(svc: ServicesDep) -> Response:
    """Prometheus text format; the figures live in Redis, so every API replica reports the same."""
    return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")
