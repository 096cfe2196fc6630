"""What /metrics tells an autoscaler: delivered tasks that a dead worker left unacknowledged count as
outstanding work only while running them again would do something (their job is still open and, for a
shard, the shard is not in the ledger yet)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ROOT

from core.embedded import EmbeddedRedis
from core.jobstore import JobStore
from core.metrics import UNACKED, Metrics, running_units
from core.queue import make_app
from core.settings import Settings

# A worker that takes every task on the queue and dies (SIGKILL) before acknowledging any.
_HOLDER = """
import sys, time
from kombu import Connection
with Connection(sys.argv[1]) as conn:
    queue = conn.SimpleQueue(sys.argv[2])
    for _ in range(int(sys.argv[3])):
        queue.get(timeout=30)
    print("holding", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    with EmbeddedRedis(tmp_path / "redis") as r:
        yield Settings.from_env({"RECAST_REDIS_URL": r.url, "RECAST_API_TOKENS": "t"})


def _job(store: JobStore, *states: str) -> str:
    job_id = store.create({"source": "file:///x", "target": "file:///y", "to": "native"}, {}, None)["id"]
    previous = "queued"
    for state in states:
        store.transition(job_id, (previous,), state)
        previous = state
    return job_id


def test_stale_unacked_tasks_count_only_while_their_job_is_open(settings: Settings) -> None:
    store = JobStore.from_settings(settings)
    celery = make_app(settings)
    running = _job(store, "running")
    store.progress(running, step="converted a", shard="a.safetensors", sha256="0" * 64, size=1)
    failed = _job(store, "running", "failed")
    sent = [
        ("recast.convert_shard", [running, "b.safetensors"]),  # open job, shard not done: work
        ("recast.finalize", [running]),  # open job: work
        ("recast.convert_shard", [running, "a.safetensors"]),  # shard already in the ledger: nothing to do
        ("recast.plan", [failed]),  # the job is over
        ("recast.finalize", ["no-such-job"]),  # the job expired
        ("recast.sweep", []),  # no job: the beat sends another every minute
    ]
    for name, args in sent:
        celery.send_task(name, args=args)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, settings.broker_url(), "recast", str(len(sent))],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert store.r.hlen(UNACKED) == len(sent) and store.r.llen("recast") == 0

    assert running_units(store) == 2
    text = Metrics(store).render().decode()
    assert 'recast_work_units{state="queued"} 0.0' in text
    assert 'recast_work_units{state="running"} 2.0' in text
    assert "recast_work_units_outstanding 2.0" in text

    store.transition(running, ("running",), "cancelled")
    assert running_units(store) == 0
    assert "recast_work_units_outstanding 0.0" in Metrics(store).render().decode()
