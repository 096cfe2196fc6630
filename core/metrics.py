"""Prometheus metrics. Everything but request latency lives in Redis: workers are separate processes
(and machines), so they add to Redis counters, and any API replica reads the same figures at scrape
time; nothing is lost when a process restarts."""

from __future__ import annotations

import base64
import json
import time

import redis
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from core.fleet import ALIVE_S
from core.jobstore import PREFIX, WORKERS_KEY, JobStore
from core.settings import QUEUE
from core.states import TERMINAL

COUNTERS = f"{PREFIX}metrics:counters"
SHARD_SECONDS = f"{PREFIX}metrics:shard_seconds"
SHARD_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600, float("inf"))
UNACKED = "unacked"  # kombu's Redis transport keeps delivered, unacknowledged tasks in this hash
# The tasks of worker/tasks.py that work on a job: their first argument is its id, a shard's second its name.
JOB_TASKS = ("recast.plan", "recast.convert_shard", "recast.metadata", "recast.finalize")
SHARD_TASK = "recast.convert_shard"


def record_shard(r: redis.Redis, seconds: float, bytes_in: int, bytes_out: int) -> None:
    pipe = r.pipeline(transaction=False)
    for le in SHARD_BUCKETS:
        if seconds <= le:
            pipe.hincrby(SHARD_SECONDS, str(le), 1)
    pipe.hincrbyfloat(SHARD_SECONDS, "sum", seconds)
    pipe.hincrby(COUNTERS, "bytes_in", bytes_in)
    pipe.hincrby(COUNTERS, "bytes_out", bytes_out)
    pipe.execute()


def count(r: redis.Redis, name: str, n: int = 1) -> None:
    """Bump one of the counters below (verification failures, schedule firings by outcome...)."""
    r.hincrby(COUNTERS, name, n)


def alive_workers(store: JobStore) -> int:
    return int(store.r.zcount(WORKERS_KEY, time.time() - ALIVE_S, "+inf"))


def running_units(store: JobStore) -> int:
    """Delivered, unacknowledged tasks that still stand for work a worker must do.

    kombu keeps a delivered task in ``unacked`` until its late ack, so the hash also holds tasks whose
    worker died, or whose ack was lost with a Redis restart: Redis hands those out again only after the
    visibility timeout (hours). Such an entry is outstanding work exactly when running it again would do
    something: its job is still open (not finished, cancelled or expired) and, for a shard, the shard is
    not yet in the job's ledger. That is what an autoscaler needs: a stale task of an open job keeps one
    worker up to take it back, and a task of a job that is over never keeps workers up. The age of an
    entry could not tell the two apart; tasks of no job (the beat's sweep, a schedule firing) last
    seconds, are sent again by the beat, and are not counted. An entry that cannot be read counts.
    """
    n = 0
    for raw in store.r.hvals(UNACKED):
        try:
            message = json.loads(raw)[0]
            task = message["headers"]["task"]
            body = message["body"]
            if message["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]
        except (ValueError, KeyError, IndexError, TypeError):
            n += 1
            continue
        if task not in JOB_TASKS:
            continue
        job = store.get(args[0])
        if job is None or job["state"] in TERMINAL:
            continue
        if task == SHARD_TASK and store.shard_done(args[0], args[1]):
            continue
        n += 1
    return n


class _Collector:
    def __init__(self, store: JobStore):
        self.store = store

    def collect(self):
        r = self.store.r
        jobs = GaugeMetricFamily("recast_jobs", "Jobs in the store, by state", labels=["state"])
        for state, n in self.store.counts().items():
            jobs.add_metric([state], n)
        yield jobs
        queued, running = int(r.llen(QUEUE)), running_units(self.store)
        work = GaugeMetricFamily(
            "recast_work_units", "Work units (plan, shard, finalize tasks) waiting, or delivered for a job "
            "still open: scale workers on the sum", labels=["state"],
        )  # fmt: skip
        work.add_metric(["queued"], queued)
        work.add_metric(["running"], running)
        yield work
        yield GaugeMetricFamily(
            "recast_work_units_outstanding", "Queued plus running work units", queued + running
        )
        alive = alive_workers(self.store)
        yield GaugeMetricFamily(
            "recast_workers_alive", "Workers with a heartbeat in the last 30 s", value=alive
        )
        c = {k: float(v) for k, v in r.hgetall(COUNTERS).items()}
        for name, help_ in (
            ("bytes_in", "Source bytes converted"),
            ("bytes_out", "Bytes written to targets"),
        ):
            yield CounterMetricFamily(f"recast_{name}", help_, value=c.get(name, 0.0))
        failures = c.get("verification_failures", 0.0)
        yield CounterMetricFamily(
            "recast_verification_failures", "Jobs that failed verification", value=failures
        )
        firings = CounterMetricFamily(
            "recast_schedule_firings", "Schedule firings, by outcome", labels=["outcome"]
        )
        for outcome in ("submitted", "skipped", "failed"):
            firings.add_metric([outcome], c.get(f"firings_{outcome}", 0.0))
        yield firings
        h = r.hgetall(SHARD_SECONDS)
        buckets = [
            ("+Inf" if le == float("inf") else str(le), float(h.get(str(le), 0))) for le in SHARD_BUCKETS
        ]
        yield HistogramMetricFamily(
            "recast_shard_seconds", "Time to convert and stage one output shard", buckets=buckets,
            sum_value=float(h.get("sum", 0.0)),
        )  # fmt: skip


class Metrics:
    def __init__(self, store: JobStore):
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(store))
        self.requests = Histogram(
            "recast_http_request_seconds", "API request latency", ["method", "route", "status"],
            registry=self.registry,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)
