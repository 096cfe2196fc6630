"""Errors as ``application/problem+json`` (RFC 9457): a stable ``code``, a sentence a person can act on.

Clients branch on ``code``, so every refusal gets a specific one: the engine's and the stores' errors
keep theirs (``bad_checkpoint``, ``storage_unavailable``…), and where the API calls into them it says
what a generic store error means at that point (``recoded``). Each route declares the problems it can
answer with (``declared``), so generated clients parse them into the ``Problem`` schema.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.schemas import MAX_BODY_BYTES, Problem
from worker.engine.errors import RecastError
from worker.stores import TransientStorageError

MEDIA_TYPE = "application/problem+json"
_PROBLEM_REF = f"#/components/schemas/{Problem.__name__}"
# Starlette's own refusals, by status: 400 and 413 come from reading a request body (not UTF-8; larger
# than the limit), so every operation that takes one declares them.
_HTTP_CODES = {400: "malformed_body", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large"}  # fmt: skip
BODY_PROBLEMS = {400: ("malformed_body",), 413: ("payload_too_large",)}
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
TOO_LARGE = f"the body is larger than {MAX_BODY_BYTES} bytes, the most the API accepts"


class HTTPProblem(RecastError):
    """A refusal with its HTTP status. A ``RecastError``, so a schedule firing records it like any other."""

    def __init__(
        self, status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers, self.extra = status, code, detail, headers, extra


@contextmanager
def recoded(codes: Mapping[type[RecastError], str], field: str = "") -> Iterator[None]:
    """Refuse with a specific code (422) for the store or engine errors raised inside the block.

    ``codes`` maps error classes to what they mean at this call site: a ``CheckpointError`` while
    listing a source means it is not there, while reading its headers that it is not a checkpoint.
    ``RecastError`` stands for the errors that carry no code of their own (a store's "access denied");
    errors that do (a refusal, ``storage_unavailable``, ``unsupported_model``) keep theirs unless their
    class is named. ``field`` names the request field the detail is about.
    """
    try:
        yield
    except RecastError as exc:
        generic = exc.code == RecastError.code
        code = next((c for kind, c in codes.items() if isinstance(exc, kind) and (kind is not RecastError or generic)),
                    None)  # fmt: skip
        if code is None:
            raise
        raise HTTPProblem(422, code, f"{field}: {exc}" if field else str(exc)) from exc


def declared(problems: Mapping[int, tuple[str, ...]]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the problems a route can answer with, by status, naming their codes."""
    return {
        status: {"model": Problem, "description": _described(codes)} for status, codes in problems.items()
    }


def _described(codes: tuple[str, ...]) -> str:
    return "Problem codes: " + ", ".join(f"`{c}`" for c in codes)


def response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = Problem(type=f"urn:recast:problem:{code}", title=code.replace("_", " "), status=status, detail=detail,
                   code=code, **extra)  # fmt: skip
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=status, media_type=MEDIA_TYPE, headers=headers
    )


def install(app: FastAPI) -> None:
    """Answer every error as a problem, and declare problems under their own media type in the schema."""

    @app.exception_handler(HTTPProblem)
    async def _problem(_: Request, exc: HTTPProblem) -> JSONResponse:
        return response(exc.status, exc.code, exc.detail, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Only the field and pydantic's message: the rejected input (a pasted secret, say) is never echoed.
        errors = [
            {"field": ".".join(str(p) for p in e["loc"] if p != "body"), "message": e["msg"]}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return response(422, "invalid_request", detail, errors=errors)

    @app.exception_handler(TransientStorageError)
    async def _transient(_: Request, exc: TransientStorageError) -> JSONResponse:
        return response(503, exc.code, f"{exc}; try again shortly", {"Retry-After": "10"})

    @app.exception_handler(RecastError)
    async def _recast(_: Request, exc: RecastError) -> JSONResponse:
        return response(422, exc.code, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route that matched the path; each method is
            # a route of its own here, so the answer must name all of them.
            def serves(method: str) -> bool:
                return any(
                    r.matches({**request.scope, "method": method})[0] is Match.FULL for r in app.routes
                )

            headers = {**(headers or {}), "Allow": ", ".join(filter(serves, _METHODS))}
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        detail = TOO_LARGE if exc.status_code == 413 else str(exc.detail)  # Starlette's: "Content Too Large"
        return response(exc.status_code, code, detail, headers)

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI declares a response model under the route's media type (``application/json``, or
        ``text/event-stream`` for the event stream); problems are ``application/problem+json``, and a
        client that dispatches on the content type must be told so. Every operation that takes a body
        declares the refusals of reading one (``BODY_PROBLEMS``), which no route raises itself."""
        if app.openapi_schema is None:
            problem = {MEDIA_TYPE: {"schema": {"$ref": _PROBLEM_REF}}}
            for operation in (op for path in generate()["paths"].values() for op in path.values()):
                answers = operation.setdefault("responses", {})
                for answer in answers.values():
                    if {"schema": {"$ref": _PROBLEM_REF}} in answer.get("content", {}).values():
                        answer["content"] = problem
                if "requestBody" in operation:
                    for status, codes in BODY_PROBLEMS.items():
                        answers.setdefault(
                            str(status), {"description": _described(codes), "content": problem}
                        )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
