"""A Python client for a running Recast service: submit, list, read, follow, cancel and report jobs.

For pipelines: ``Client().submit(...)`` then ``wait(job_id)`` is what ``recast jobs submit --wait`` does.
It depends on httpx and httpx-sse only, never on the engine, torch or the service, so a CI step can use
it without them. Answers are the API's JSON as typed dicts (the shapes of ``service/schemas.py``);
refusals raise ``ApiError`` with the problem's stable ``code``. Following a job reads its server-sent
events and, when the connection drops, resumes from the last event it saw (``Last-Event-ID``), so a
watcher neither misses nor repeats a state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, NamedTuple, TypedDict

import httpx
from httpx_sse import connect_sse

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
# A stream sends a keepalive comment every 15 s while nothing happens; silence well past that is a dead
# connection, which is then resumed.
STREAM_READ_TIMEOUT_S = 60.0
RECONNECTS = 5


class Progress(TypedDict):
    step: str
    shards_total: int
    shards_done: int
    bytes_total: int
    bytes_in: int
    bytes_out: int
    throughput_bytes_s: float | None  # all workers together, lately; None unless running
    eta_s: float | None  # until every source byte is read at that throughput


class JobError(TypedDict):
    code: str
    message: str


class Job(TypedDict):
    """A job as the API returns it (``GET /v1/jobs/{id}``); times are ISO 8601 strings."""

    id: str
    state: str
    request: dict[str, Any]
    labels: dict[str, str]
    adapter: str | None
    source_revision: str | None
    progress: Progress
    created_at: str
    started_at: str | None
    finished_at: str | None
    updated_at: str
    error: JobError | None
    result: dict[str, Any] | None  # url, and commit, pr_url, model_card for Hub targets
    links: dict[str, str]


class JobPage(TypedDict):
    jobs: list[Job]
    next_cursor: str | None


class Event(NamedTuple):
    """One server-sent event: its id (for resuming), its type (``state`` or ``progress``), the job then."""

    id: str
    type: str
    job: Job


class ApiError(Exception):
    """The service refused a request (RFC 9457 problem details; branch on ``code``), or, with ``status``
    0, none was made: the service could not be reached (``unreachable``) or the job id was not one."""

    def __init__(self, status: int, code: str, detail: str, problem: Mapping[str, Any] | None = None):
        super().__init__(f"{detail} ({code}, HTTP {status})")
        self.status, self.code, self.detail = status, code, detail
        self.problem = dict(problem or {})


class Client:
    """A session with one Recast service.

    ``url`` and ``token`` default to ``RECAST_URL`` (else ``http://127.0.0.1:8000``) and ``RECAST_TOKEN``;
    the token is sent as a bearer token and never appears in errors. ``transport`` is for tests and
    proxies (any httpx transport).
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("RECAST_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("RECAST_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(
                0, "unreachable", f"cannot reach the Recast service at {self.url}: {exc}"
            ) from None
        _raise_for_problem(r)
        return r.json()

    def submit(
        self,
        source: str,
        target: str,
        to: str,
        *,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> Job:
        """Queue a conversion of ``source`` into ``target`` (``to``: ``native`` or ``hf``).

        ``options`` are the request's other fields (``adapter``, ``dtype``, ``quantize``, ``format``,
        ``verify``, ``overwrite``, ``labels``, ``commit_message``, ``create_pr``, ``source_credential``,
        ``target_credential``); ``None`` values are left out. With ``idempotency_key``, submitting the
        same request again returns the same job.
        """
        body = {"source": source, "target": target, "to": to}
        body |= {k: v for k, v in options.items() if v is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=body, headers=headers)

    def list(
        self, state: str | None = None, label: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> JobPage:
        """One page of jobs, newest first; ``label`` is ``key=value``; pass ``next_cursor`` back as ``cursor``."""
        params = {"state": state, "label": label, "limit": limit, "cursor": cursor}
        return self._call("GET", "/v1/jobs", params={k: v for k, v in params.items() if v is not None})

    def get(self, job_id: str) -> Job:
        """The job now: state, progress, timings, error or result."""
        return self._call("GET", f"/v1/jobs/{_id(job_id)}")

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, a running one at its next work unit (its output removed)."""
        return self._call("POST", f"/v1/jobs/{_id(job_id)}/cancel")

    def report(self, job_id: str) -> dict[str, Any]:
        """The verification report (per-tensor checks, key accounting); ``report_not_ready`` before it."""
        return self._call("GET", f"/v1/jobs/{_id(job_id)}/report")

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """Every state and progress event of the job until its final state, resuming after a dropped
        connection from the last event seen (at most ``RECONNECTS`` times in a row)."""
        path = f"/v1/jobs/{_id(job_id)}/events"
        timeout = httpx.Timeout(self._http.timeout.connect, read=STREAM_READ_TIMEOUT_S)
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with connect_sse(self._http, "GET", path, headers=headers, timeout=timeout) as stream:
                    _raise_for_problem(stream.response)
                    for sse in stream.iter_sse():
                        failures = 0
                        last_event_id = sse.id or last_event_id
                        yield Event(sse.id, sse.event, sse.json())
                return
            except httpx.TransportError as exc:
                failures += 1
                if failures > RECONNECTS:
                    raise ApiError(
                        0, "unreachable", f"lost the event stream of job {job_id}: {exc}"
                    ) from None
                time.sleep(min(2 ** (failures - 1), 15))

    def wait(self, job_id: str, on_event: Callable[[Event], None] | None = None) -> Job:
        """Follow the job until it has finished and return it as it ended; ``on_event`` sees every event."""
        for event in self.events(job_id):
            if on_event is not None:
                on_event(event)
            if event.type == "state" and event.job["state"] in TERMINAL:
                return event.job
        return self.get(job_id)  # the stream ended at once: the job had finished before


def _id(job_id: str) -> str:
    """Job ids go into URL paths: refuse anything that would change the path."""
    if not job_id or any(c in job_id for c in "/?#%") or job_id in (".", ".."):
        raise ApiError(0, "invalid_job_id", f"{job_id!r} is not a job id")
    return job_id


def _raise_for_problem(r: httpx.Response) -> None:
    if r.is_success:
        return
    r.read()
    try:
        problem = r.json()
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    detail = problem.get("detail") or r.reason_phrase or "request failed"
    raise ApiError(r.status_code, problem.get("code") or f"http_{r.status_code}", str(detail), problem)


__all__ = ["ApiError", "Client", "Event", "Job", "JobPage", "Progress"]
