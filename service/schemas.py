"""Request and response bodies of the /v1 API, each a named schema so generated clients get typed models.

Unknown request fields are rejected, so a secret pasted into a request body is refused instead of stored.
What needs the server's configuration (credential names, adapters, whether a source exists) is checked
by ``service.submission`` rather than here, so those refusals carry their own problem codes.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, StringConstraints, field_validator

from core.jobstore import THROUGHPUT_EVERY_S
from core.states import STATES
from worker.engine.adapters import ADAPTERS
from worker.engine.encode import QUANTIZE_MODES
from worker.engine.options import DTYPE_ARGS
from worker.engine.qformat import FORMAT_NAMES

# Limits of a request (README, Limits): no body the API takes comes near 1 MiB, nor headers 16 KiB; every
# string a client sends is bounded, so what is stored per job and repeated in answers stays small.
MAX_BODY_BYTES = 1024 * 1024
MAX_HEAD_BYTES = 16 * 1024
MAX_LABELS = 32
MAX_LABEL_VALUE = 256
MAX_LOCATION = 4096  # PATH_MAX: a file:// path can be that long; S3 keys and Hub repo ids are shorter
MAX_NAME = 100  # credential and adapter names, a schedule's name
MAX_PATTERN = 256
MAX_CRON = 128
MAX_COMMIT_MESSAGE = 1000
STALE_S = 30  # a job's throughput older than this (or three sampling intervals) is not shown
LabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$")]
# Any text without control characters: a value is shown in the dashboard and repeated, never parsed.
LabelValue = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_LABEL_VALUE, pattern=r"^[^\x00-\x1f\x7f]+$")
]
Location = Annotated[str, StringConstraints(max_length=MAX_LOCATION)]
Name = Annotated[str, StringConstraints(max_length=MAX_NAME)]

# Choices spelled once, by the job store and the engine; enums here, so a generated client gets one named
# type for each instead of one per field that uses it.
JobState = StrEnum("JobState", [(s, s) for s in STATES])
Dtype = StrEnum("Dtype", [(d, d) for d in DTYPE_ARGS])
Quantize = StrEnum("Quantize", [(q, q) for q in QUANTIZE_MODES])
QuantFormatName = StrEnum("QuantFormatName", [(f, f) for f in FORMAT_NAMES])


class Format(StrEnum):
    """A checkpoint's layout: Hugging Face safetensors, or NeMo AutoModel's native one."""

    NATIVE = "native"
    HF = "hf"


_ADAPTER = (
    f"model family, one of {', '.join(ADAPTERS)} (GET /v1/adapters); detected from the config when omitted"
)
_CREDENTIAL = "the name of a credential configured on the server (RECAST_CREDENTIALS_FILE), never a secret"


def _labels_schema(schema: dict[str, Any]) -> None:
    """pydantic writes a constrained key type as ``patternProperties``, which in JSON Schema lets every
    other key through; ``propertyNames`` says which keys are accepted, and generated clients keep a map."""
    ((key_pattern, value),) = schema.pop("patternProperties").items()
    schema.update(propertyNames={"pattern": key_pattern}, additionalProperties=value)


def _labels(most: int, note: str = "") -> Any:
    """The ``labels`` field, bounded: each label is a Redis index and a tag on every page that lists jobs."""
    return Field(default_factory=dict, max_length=most, json_schema_extra=_labels_schema,
                 description=f"at most {most} labels; {note}keys are 1-63 of A-Z a-z 0-9 _ . - / (starting with "
                 f"a letter or digit), values 1-{MAX_LABEL_VALUE} characters, no control characters")  # fmt: skip


class JobRequest(BaseModel):
    """A conversion to run: where from, where to, which way, and how."""

    model_config = ConfigDict(extra="forbid")

    source: Location = Field(
        description="a checkpoint: file:///…, s3://bucket/prefix or hf://org/repo[@revision]"
    )
    target: Location = Field(
        description="where the converted checkpoint goes; must be empty unless overwrite is set"
    )
    to: Format = Field(description="the layout to convert to")
    adapter: Name | None = Field(None, description=_ADAPTER)
    dtype: Dtype = Field(Dtype.bf16, description="the dtype dequantized weights are written in")
    quantize: Quantize = Field(Quantize.keep, description="how FP8 weights are written, converting to hf")
    format: QuantFormatName | None = Field(
        None, description="how quantized hf output is spelled; default: the source's, fp8 if none is recorded"
    )
    verify: bool = True
    overwrite: bool = Field(False, description="replace what the target holds when the job publishes")
    labels: dict[LabelKey, LabelValue] = _labels(MAX_LABELS)
    commit_message: str | None = Field(None, max_length=MAX_COMMIT_MESSAGE)
    create_pr: bool = False
    source_credential: Name | None = Field(None, description=_CREDENTIAL)
    target_credential: Name | None = Field(None, description=_CREDENTIAL)


class InspectRequest(BaseModel):
    """A checkpoint to preflight from its headers."""

    model_config = ConfigDict(extra="forbid")

    source: Location
    adapter: Name | None = Field(None, description=_ADAPTER)
    dtype: Dtype = Dtype.bf16
    source_credential: Name | None = Field(None, description=_CREDENTIAL)


class Progress(BaseModel):
    step: str
    shards_total: int
    shards_done: int
    bytes_total: int
    bytes_in: int
    bytes_out: int
    throughput_bytes_s: float | None = Field(
        None, description="source bytes read per second, all workers together, over the last few seconds; "
        "null unless the job is running and reported progress lately",
    )  # fmt: skip
    eta_s: float | None = Field(
        None, description="seconds until every source byte is read at that throughput (then verification and "
        "publishing follow); null where the throughput is",
    )  # fmt: skip


class JobError(BaseModel):
    code: str
    message: str


class JobResult(BaseModel):
    """Where the published checkpoint is; ``commit``, ``pr_url`` and ``model_card`` for Hub targets."""

    url: str
    commit: str | None = None
    pr_url: str | None = None
    model_card: bool | None = Field(
        None,
        description="Hub targets: true when README.md is Recast's model card, false when the repository's "
        "own README.md was kept (overwrite not set)",
    )


class JobLinks(BaseModel):
    # ``self`` is the usual name of the link, but not a usable attribute name; by alias also in the event
    # stream, which serializes without FastAPI's response handling.
    model_config = ConfigDict(validate_by_name=True, serialize_by_alias=True)

    self_: str = Field(alias="self")
    events: str
    report: str
    cancel: str


class Job(BaseModel):
    id: str
    state: JobState
    request: JobRequest = Field(description="the request the job was submitted with")
    labels: dict[str, str]
    adapter: str | None
    source_revision: str | None
    progress: Progress
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    error: JobError | None
    result: JobResult | None
    links: JobLinks

    @classmethod
    def of(cls, rec: dict[str, Any]) -> Job:
        def when(field: str) -> datetime | None:
            raw = rec.get(field)
            return datetime.fromtimestamp(float(raw), UTC) if raw else None

        base = f"/v1/jobs/{rec['id']}"
        labels = rec.get("labels") or {}
        rate = _throughput(rec)
        left = max(rec.get("bytes_total", 0) - rec.get("bytes_in", 0), 0)
        return cls(
            id=rec["id"],
            state=rec["state"],
            request=JobRequest.model_validate({**rec["request"], "labels": labels}),
            labels=labels,
            adapter=rec.get("adapter") or None,
            source_revision=rec.get("source_revision") or None,
            progress=Progress(
                step=rec.get("step", ""),
                **{
                    f: rec.get(f, 0)
                    for f in ("shards_total", "shards_done", "bytes_total", "bytes_in", "bytes_out")
                },
                throughput_bytes_s=rate,
                eta_s=left / rate if rate else None,
            ),
            created_at=when("created_at"),
            started_at=when("started_at"),
            finished_at=when("finished_at"),
            updated_at=when("updated_at"),
            error=JobError(code=rec["error_code"], message=rec.get("error_message", ""))
            if rec.get("error_code")
            else None,
            result=rec.get("result") or None,
            links=JobLinks(
                self_=base, events=f"{base}/events", report=f"{base}/report", cancel=f"{base}/cancel"
            ),
        )


def _throughput(rec: dict[str, Any]) -> float | None:
    """The job's latest throughput sample, if it is running and the sample is recent: a job whose workers
    went quiet has no throughput to show, rather than an old one."""
    if rec.get("state") != "running" or not rec.get("throughput"):
        return None
    every = float(rec.get("throughput_every") or THROUGHPUT_EVERY_S)
    if time.time() - float(rec.get("throughput_at") or 0) > max(STALE_S, 3 * every):
        return None
    return float(rec["throughput"]) or None


class ThroughputPoint(BaseModel):
    at: datetime
    bytes_in: int = Field(description="source bytes read by then, all workers together")
    bytes_per_s: float | None = Field(description="rate since the previous point; null for the first")


class JobThroughput(BaseModel):
    """A job's throughput over time: samples every few seconds, thinned as the job goes on so a job of any
    length keeps its whole history in at most a few hundred points."""

    points: list[ThroughputPoint]

    @classmethod
    def of(cls, samples: list[tuple[float, int]]) -> JobThroughput:
        points = []
        for i, (at, total) in enumerate(samples):
            prev = samples[i - 1] if i else None
            rate = (total - prev[1]) / (at - prev[0]) if prev and at > prev[0] else None
            points.append(
                ThroughputPoint(at=datetime.fromtimestamp(at, UTC), bytes_in=total, bytes_per_s=rate)
            )
        return cls(points=points)


class JobPage(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = Field(description="pass back as cursor for the next page; null on the last")


class JobReport(RootModel[dict[str, Any]]):
    """The verification report: per-tensor checks, the accounting of every source key, bytes and seconds."""


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


class QuantGroup(BaseModel):
    """One scheme of the source's quantization_config (compressed-tensors: a config group)."""

    group: str
    targets: list[str]
    weights: str
    block_structure: list[int] | None
    input_activations: str | None


class OutputFormat(BaseModel):
    keep: bool = Field(description="whether quantize=keep can write the source's FP8 bytes in this format")
    quantize: list[str] = Field(description="the fresh quantize schemes this format takes")


class QuantizationInfo(BaseModel):
    quantized_tensors: int
    schemes: list[str]
    block_size: list[int] | None
    activation_scheme: str | None
    format: QuantFormatName = Field(description="how the source spells FP8 (for native: its recorded source)")
    groups: list[QuantGroup]
    output_formats: dict[str, OutputFormat]


class ConversionEstimate(BaseModel):
    to: Format
    dtype: Dtype
    output_bytes: int | None
    disk_bytes_needed: int
    peak_host_memory_bytes: int


class CheckpointInfo(BaseModel):
    """What a checkpoint is and what converting it would write and need, read from its headers."""

    source: str
    format: Format
    adapter: str
    layout: str
    architectures: list[str] | None
    quantization: QuantizationInfo
    shards: int
    tensors: int
    bytes: int
    largest_shard_bytes: int
    carried_files: list[str]
    conversion: ConversionEstimate


class ScheduleTemplate(JobRequest):
    """A job request whose source is a place to look for the newest checkpoint, not a checkpoint."""

    source: Location = Field(description="hf://org/repo (its newest revision), or an s3:// or file:// prefix "
                             "whose checkpoint directories source_pattern selects")  # fmt: skip
    source_pattern: str | None = Field(
        None,
        max_length=MAX_PATTERN,
        description="glob on checkpoint directory names, e.g. 'step-*'; every directory when omitted",
    )
    target: Location = Field(description="where each firing writes; must contain {name} or {revision}")
    labels: dict[LabelKey, LabelValue] = _labels(MAX_LABELS - 1, "each firing's job also gets `schedule`; ")

    @field_validator("target")
    @classmethod
    def _placeholder(cls, v: str) -> str:
        if "{name}" not in v and "{revision}" not in v:
            raise ValueError("must contain {name} or {revision}, so every firing writes to a new location")
        return v


class ScheduleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=MAX_NAME)
    cron: str = Field(
        max_length=MAX_CRON, description="five fields, UTC: minute hour day-of-month month day-of-week"
    )
    template: ScheduleTemplate
    paused: bool = False


class SchedulePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    cron: str | None = Field(None, max_length=MAX_CRON)
    template: ScheduleTemplate | None = None
    paused: bool | None = None


class Schedule(BaseModel):
    id: str
    name: str
    cron: str
    template: ScheduleTemplate
    paused: bool
    created_at: datetime
    next_run_at: datetime | None
    last_run_at: datetime | None


class ScheduleList(BaseModel):
    schedules: list[Schedule]


class Firing(BaseModel):
    """One firing of a schedule: the job it submitted, or why it skipped or failed."""

    at: datetime
    manual: bool
    job_id: str | None
    skipped_reason: str | None
    source: str | None
    source_revision: str | None
    error: str | None
    error_code: str | None = None


class FiringList(BaseModel):
    firings: list[Firing]


class Health(BaseModel):
    status: Literal["ok"]


class ReadinessChecks(BaseModel):
    redis: str = Field(description="ok, or why Redis is unreachable")
    workers: int = Field(0, description="workers with a heartbeat in the last 30 s")


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: ReadinessChecks


class WorkerShard(BaseModel):
    """A shard (or the metadata) one of a worker's pool processes is writing."""

    slot: int = Field(description="the pid of the pool process converting it")
    job_id: str
    shard: str = Field(description="the output shard, or `metadata` for the unit that writes the index, "
                       "config and scales sidecar")  # fmt: skip
    started_at: datetime
    bytes_in: int = Field(description="source bytes of this shard read so far")
    throughput_bytes_s: float = Field(description="bytes_in over the time since the shard started")


class Worker(BaseModel):
    """A Celery worker (one device, ``slots`` pool processes converting a shard each) as its heartbeat
    and its shards' progress report it."""

    name: str
    host: str
    pid: int = Field(description="the worker's parent process")
    device: str = Field(description="cpu, or the CUDA device (its name once it has converted a shard)")
    slots: int = Field(description="shards it converts at once (RECAST_LANES; 2 on a CPU, 3 on a GPU)")
    alive: bool = Field(description="a heartbeat came in the last 30 s (heartbeats come every 10 s)")
    started_at: datetime | None
    last_heartbeat: datetime
    shards_done: int = Field(description="shards this worker converted and recorded since it started")
    converting: list[WorkerShard] = Field(description="what its pool processes convert now, oldest first; "
                                          "empty when idle")  # fmt: skip

    @classmethod
    def of(cls, rec: dict[str, Any]) -> Worker:
        def when(raw: str | float | None) -> datetime | None:
            return datetime.fromtimestamp(float(raw), UTC) if raw else None

        return cls(
            name=rec["name"], host=rec.get("host", ""), pid=int(rec.get("pid") or 0),
            device=rec.get("device", ""), slots=int(rec.get("slots") or 1), alive=rec["alive"],
            started_at=when(rec.get("started_at")), last_heartbeat=when(rec.get("heartbeat_at")),
            shards_done=int(rec.get("shards_done") or 0),
            converting=[WorkerShard(**{**u, "started_at": when(u["started_at"])}) for u in rec["converting"]],
        )  # fmt: skip


class QueueDepth(BaseModel):
    jobs_queued: int = Field(description="jobs accepted and not started yet")
    jobs_active: int = Field(description="jobs running, verifying or uploading")
    work_units_queued: int = Field(
        description="tasks (plan, shard, finalize) waiting in the queue for a free worker"
    )


class WorkerList(BaseModel):
    """The fleet: every worker heard from in the last 15 minutes, and what waits for them."""

    workers: list[Worker]
    queue: QueueDepth


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """An error (RFC 9457 problem details); clients branch on ``code``."""

    type: str
    title: str
    status: int
    detail: str = Field(description="what was wrong, naming the field, file or key, and what to do")
    code: str = Field(description="stable machine-readable reason, e.g. source_not_found")
    errors: list[FieldError] | None = Field(None, description="every invalid field, for invalid_request")
    allowed: list[str] | None = Field(
        None, description="the accepted values, where a name was not one of them"
    )
