"""Request and response bodies of the /v1 API. Unknown fields are rejected, so a credential pasted into
a request body is refused instead of stored; credentials are referenced by name only."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.engine.adapters import ADAPTERS

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


def _adapter(v: str | None) -> str | None:
    if v is not None and v not in ADAPTERS:
        raise ValueError(f"unknown adapter {v!r}; GET /v1/adapters lists them")
    return v


def _credential(v: str | None) -> str | None:
    if v is not None and not _NAME.match(v):
        raise ValueError("a credential is referenced by its configured name (letters, digits, . _ -)")
    return v


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="file:///…, s3://bucket/prefix or hf://org/repo[@revision]")
    target: str = Field(description="where the converted checkpoint goes; must be empty")
    to: Literal["native", "hf"]
    adapter: str | None = Field(None, description="model family; detected from the config when omitted")
    dtype: Literal["bf16", "fp32", "fp16"] = "bf16"
    quantize: Literal["keep", "none", "per-tensor", "block"] = "keep"
    verify: bool = True
    labels: dict[str, str] = Field(default_factory=dict)
    commit_message: str | None = Field(None, max_length=1000)
    create_pr: bool = False
    source_credential: str | None = Field(None, description="name of a configured credential")
    target_credential: str | None = Field(None, description="name of a configured credential")

    _check_adapter = field_validator("adapter")(_adapter)
    _check_credentials = field_validator("source_credential", "target_credential")(_credential)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 20:
            raise ValueError("at most 20 labels")
        for k, val in v.items():
            if not _LABEL.match(k) or not _LABEL.match(val):
                raise ValueError(f"label {k!r}={val!r}: keys and values are 1-63 of A-Z a-z 0-9 _ . - /")
        return v


class InspectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str
    adapter: str | None = None
    dtype: Literal["bf16", "fp32", "fp16"] = "bf16"
    source_credential: str | None = None

    _check_adapter = field_validator("adapter")(_adapter)
    _check_credentials = field_validator("source_credential")(_credential)


class Progress(BaseModel):
    step: str
    shards_total: int
    shards_done: int
    bytes_total: int
    bytes_in: int
    bytes_out: int


class JobError(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    id: str
    state: str
    request: dict[str, Any]
    labels: dict[str, str]
    adapter: str | None
    source_revision: str | None
    progress: Progress
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    error: JobError | None
    result: dict[str, Any] | None
    links: dict[str, str]

    @classmethod
    def of(cls, rec: dict[str, Any]) -> Job:
        def when(field: str) -> datetime | None:
            raw = rec.get(field)
            return datetime.fromtimestamp(float(raw), UTC) if raw else None

        base = f"/v1/jobs/{rec['id']}"
        return cls(
            id=rec["id"],
            state=rec["state"],
            request=rec["request"],
            labels=rec.get("labels") or {},
            adapter=rec.get("adapter") or None,
            source_revision=rec.get("source_revision") or None,
            progress=Progress(
                step=rec.get("step", ""),
                **{f: rec.get(f, 0) for f in ("shards_total", "shards_done", "bytes_total", "bytes_in", "bytes_out")},
            ),
            created_at=when("created_at"),
            started_at=when("started_at"),
            finished_at=when("finished_at"),
            updated_at=when("updated_at"),
            error=JobError(code=rec["error_code"], message=rec.get("error_message", ""))
            if rec.get("error_code")
            else None,
            result=rec.get("result") or None,
            links={"self": base, "events": f"{base}/events", "report": f"{base}/report", "cancel": f"{base}/cancel"},
        )


class JobPage(BaseModel):
    jobs: list[Job]
    next_cursor: str | None


class Adapter(BaseModel):
    """A model family and how detection recognises it (``worker.engine.adapters.Adapter.describe``)."""

    name: str
    description: str
    architectures: list[str]
    model_types: list[str]
    expert_keys: list[str]
    detection: str
    # NeMo AutoModel 0.7.0's state-dict adapter whose layout native follows; null: NeMo uses the hf names.
    nemo_adapter: str | None


class ScheduleTemplate(JobRequest):
    """A job request whose source is a place to look for the newest checkpoint, not a checkpoint."""

    source: str = Field(description="hf://org/repo (its newest revision), or an s3:// or file:// prefix "
                        "searched with source_pattern")  # fmt: skip
    source_pattern: str | None = Field(None, description="glob on checkpoint directory names, e.g. 'step-*'")
    target: str = Field(description="where each firing writes; must contain {name} or {revision}")

    @field_validator("target")
    @classmethod
    def _placeholder(cls, v: str) -> str:
        if "{name}" not in v and "{revision}" not in v:
            raise ValueError("must contain {name} or {revision}, so every firing writes to a new location")
        return v


class ScheduleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    cron: str = Field(description="five fields, UTC: minute hour day-of-month month day-of-week")
    template: ScheduleTemplate
    paused: bool = False


class SchedulePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=100)
    cron: str | None = None
    template: ScheduleTemplate | None = None
    paused: bool | None = None
