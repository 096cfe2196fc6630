"""Prometheus metrics. Job counts are read from Redis at scrape time, so every API replica reports the
same figures and nothing is lost when one restarts; request latency is per process."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from service.jobstore import WORKERS_KEY, JobStore

ALIVE_S = 30


class _JobCollector:
    def __init__(self, store: JobStore):
        self.store = store

    def collect(self):
        jobs = GaugeMetricFamily("recast_jobs", "Jobs known to the store, by state", labels=["state"])
        for state, n in self.store.counts().items():
            jobs.add_metric([state], n)
        yield jobs
        workers = GaugeMetricFamily("recast_workers_alive", "Workers that sent a heartbeat in the last 30 s")
        workers.add_metric([], alive_workers(self.store))
        yield workers


def alive_workers(store: JobStore) -> int:
    return int(store.r.zcount(WORKERS_KEY, time.time() - ALIVE_S, "+inf"))


class Metrics:
    def __init__(self, store: JobStore):
        self.registry = CollectorRegistry()
        self.registry.register(_JobCollector(store))
        self.requests = Histogram(
            "recast_http_request_seconds", "API request latency", ["method", "route", "status"],
            registry=self.registry,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)

