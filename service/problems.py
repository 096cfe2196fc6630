"""Errors as ``application/problem+json`` (RFC 9457): a stable ``code``, a sentence a person can act on."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.engine.errors import RecastError
from worker.stores import TransientStorageError

MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers, self.extra = status, code, detail, headers, extra


def response(status: int, code: str, detail: str, headers=None, **extra: Any) -> JSONResponse:
    body = {"type": f"urn:recast:problem:{code}", "title": code.replace("_", " "), "status": status,
            "detail": detail, "code": code, **extra}  # fmt: skip
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return response(exc.status, exc.code, exc.detail, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"] if p != "body"), "message": e["msg"]} for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return response(422, "invalid_request", detail, errors=errors)

    @app.exception_handler(TransientStorageError)
    async def _transient(_: Request, exc: TransientStorageError) -> JSONResponse:
        return response(503, "storage_unavailable", f"{exc}; try again shortly", {"Retry-After": "10"})

    @app.exception_handler(RecastError)
    async def _recast(_: Request, exc: RecastError) -> JSONResponse:
        return response(422, exc.code, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))
