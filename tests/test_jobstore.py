"""The job store and the job steps against a real Redis (the bundled server), without Celery."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import replace

import pytest

from core.embedded import EmbeddedRedis
from core.jobstore import Conflict, JobStore, new_id
from core.settings import Settings
from worker import jobs


@pytest.fixture
def store(tmp_path) -> Iterator[JobStore]:
    with EmbeddedRedis(tmp_path / "redis") as r:
        yield JobStore.connect(r.url, ttl_s=60)


REQUEST = {"source": "file:///nowhere/src", "target": "file:///nowhere/dst", "to": "native"}


def test_transitions_check_the_state_they_expect(store):
    job = store.create(REQUEST, {"team": "a"}, None)
    with pytest.raises(Conflict) as info:
        store.transition(job["id"], ("running",), "verifying")
    assert info.value.state == "queued"
    store.transition(job["id"], ("queued",), "running")
    assert not store.progress(job["id"], step="x", bytes_in=5)
    store.transition(job["id"], ("running",), "failed", error_code="e", error_message="m")
    assert store.progress(job["id"], bytes_in=7) is False  # a finished job takes no more progress
    got = store.get(job["id"])
    assert got["state"] == "failed" and got["bytes_in"] == 5 and got["finished_at"]
    assert (
        0 < store.r.ttl(store.key(job["id"])) <= 60 and 0 < store.r.ttl(store.key(job["id"], "events")) <= 60
    )
    kinds = [(k, j["state"]) for _, k, j in store.events(job["id"], "0", 0)]
    assert kinds == [("state", "queued"), ("state", "running"), ("progress", "running"), ("state", "failed")]


def test_ids_made_in_a_burst_sort_in_the_order_they_were_made():
    ids = [new_id() for _ in range(2000)]  # many share a millisecond
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_an_id_already_taken_is_not_reused(store, monkeypatch):
    """Two API replicas may make the same id in one millisecond: the second record gets another."""
    taken = store.create(REQUEST, {}, None)["id"]
    ids = iter([taken, taken, "01a0000000000000beef"])
    monkeypatch.setattr("core.jobstore.new_id", lambda: next(ids))
    again = store.create(REQUEST, {"batch": "y"}, None)
    assert again["id"] == "01a0000000000000beef" and store.get(taken)["labels"] == {}


def test_listing_drops_expired_jobs(store):
    ids = [store.create(REQUEST, {"batch": "x"}, None)["id"] for _ in range(4)]
    store.r.delete(store.key(ids[2]))  # expired
    page, cursor = store.list(label=("batch", "x"), limit=2)
    assert [j["id"] for j in page] == [ids[3], ids[1]]
    page, cursor = store.list(label=("batch", "x"), cursor=cursor, limit=2)
    assert [j["id"] for j in page] == [ids[0]] and cursor is None
    assert store.r.zscore("recast:jobs:label:batch=x", ids[2]) is None
    assert store.counts()["queued"] == 4  # the state index is cleaned when a listing meets the id


def test_shard_ledger_counts_each_shard_once(store):
    job = store.create(REQUEST, {}, None)
    store.transition(job["id"], ("queued",), "running")
    store.set_fields(job["id"], shards_total=2)
    assert not store.progress(job["id"], shard="a", sha256="1", size=10)
    assert not store.progress(job["id"], shard="a", sha256="1", size=10)  # redelivered
    assert store.progress(job["id"], shard="b", sha256="2", size=5)
    got = store.get(job["id"])
    assert got["shards_done"] == 2 and got["bytes_out"] == 15


def test_a_unit_that_keeps_killing_its_worker_fails_the_job(store, tmp_path):
    settings = replace(Settings(), max_attempts=2)
    queued: list[str] = []
    ctx = jobs.Context(store, settings, lambda j, n: queued.append(n), queued.append, queued.append)
    job = store.create(REQUEST, {}, None)
    store.r.hset(store.key(job["id"], "attempts"), "plan", 2)  # two starts that never ended
    jobs.plan_job(ctx, job["id"])
    got = store.get(job["id"])
    assert got["state"] == "failed" and got["error_code"] == "attempts_exhausted"
    assert "plan was started 2 times" in got["error_message"] and not queued


def test_one_job_at_a_time_writes_a_target(store):
    """A second job planned onto a target that an unfinished job writes fails with target_busy before
    it touches the target; once the first has ended, its claim gives way."""
    first = store.create(REQUEST, {}, None)["id"]
    store.transition(first, ("queued",), "running")
    assert store.claim_target(first, REQUEST["target"]) is None
    assert store.claim_target(first, REQUEST["target"]) is None, "a plan that runs again keeps its claim"
    assert store.target_holder(REQUEST["target"]) == first
    assert store.target_holder("file:///nowhere/other") is None

    queued: list[str] = []
    ctx = jobs.Context(store, Settings(), lambda j, n: queued.append(n), queued.append, queued.append)
    second = store.create(REQUEST, {}, None)["id"]
    jobs.plan_job(ctx, second)
    got = store.get(second)
    assert got["state"] == "failed" and got["error_code"] == "target_busy" and not queued
    assert first in got["error_message"] and "file:///nowhere/dst" in got["error_message"]

    store.transition(first, ("running",), "cancelled")
    assert store.target_holder(REQUEST["target"]) is None
    third = store.create(REQUEST, {}, None)["id"]
    assert store.claim_target(third, REQUEST["target"]) is None
    assert store.target_holder(REQUEST["target"]) == third


def test_throughput_samples_keep_the_whole_job_in_bounded_points(store, monkeypatch):
    """A sample at most every THROUGHPUT_EVERY_S, one at the last shard; past THROUGHPUT_POINTS every other
    sample goes and the interval doubles, so the first and the newest stay. The latest rate is in the job."""
    from core import jobstore
    from service.schemas import Job, JobThroughput

    clock = [1000.0]
    monkeypatch.setattr(jobstore, "_now", lambda: f"{clock[0]:.3f}")
    monkeypatch.setattr(jobstore.time, "time", lambda: clock[0])
    job = store.create(REQUEST, {}, None)
    store.transition(job["id"], ("queued",), "running")
    store.set_fields(job["id"], shards_total=1, bytes_total=10**10)
    steps = 6 * jobstore.THROUGHPUT_POINTS * jobstore.THROUGHPUT_EVERY_S  # enough to thin twice
    for _ in range(steps):  # 1 MB per 0.5 s: 2 MB/s
        clock[0] += 0.5
        store.progress(job["id"], bytes_in=10**6)
    samples = store.throughput(job["id"])
    assert jobstore.THROUGHPUT_POINTS // 2 <= len(samples) <= jobstore.THROUGHPUT_POINTS
    assert samples[0] == (1000.0, 0)  # from the start, at 0 bytes
    assert all(b[0] > a[0] and b[1] > a[1] for a, b in itertools.pairwise(samples))
    every = float(store.get(job["id"])["throughput_every"])
    assert every == 4 * jobstore.THROUGHPUT_EVERY_S and samples[-1][0] >= clock[0] - every
    rates = [p.bytes_per_s for p in JobThroughput.of(samples).points[1:]]
    assert all(r == pytest.approx(2e6) for r in rates), rates
    now = Job.of(store.get(job["id"])).progress
    assert now.throughput_bytes_s == pytest.approx(2e6)
    assert now.eta_s == pytest.approx((10**10 - steps * 10**6) / 2e6)
    clock[0] += 600  # the workers went quiet: no stale rate
    assert Job.of(store.get(job["id"])).progress.throughput_bytes_s is None
    store.progress(job["id"], shard="a", sha256="1", size=1)  # the last shard always samples
    assert store.throughput(job["id"])[-1][0] == clock[0]
    store.transition(job["id"], ("running",), "succeeded")
    assert 0 < store.r.ttl(store.key(job["id"], "throughput")) <= 60  # expires with the job
    assert Job.of(store.get(job["id"])).progress.throughput_bytes_s is None


def test_fleet_lists_workers_alive_and_dead_with_their_shards(store, monkeypatch):
    from core import fleet

    f = fleet.Fleet(store.r)
    f.heartbeat("w1@h", "h", 11, "cpu", 100.0, 2)
    f.heartbeat("w2@h", "h", 12, "cuda (CUDA_VISIBLE_DEVICES=1)", 100.0, 3)
    now = fleet.time.time()
    f.working("w2@h", 21, "job1", "model-00001-of-00002.safetensors", now - 2, 4_000_000, "cuda:0 · H200")
    f.working("w2@h", 22, "job1", "model-00002-of-00002.safetensors", now - 1, 0, "cuda:0 · H200")
    f.heartbeat("w2@h", "h", 12, "cuda (CUDA_VISIBLE_DEVICES=1)", 100.0, 3)  # keeps the converting name
    w1, w2 = f.workers()
    assert w1["alive"] and w1["device"] == "cpu" and w1["converting"] == [] and w1["slots"] == "2"
    assert w2["device"] == "cuda:0 · H200" and [u["slot"] for u in w2["converting"]] == [21, 22]
    first = w2["converting"][0]
    assert first["job_id"] == "job1" and first["shard"].startswith("model-00001")
    assert first["throughput_bytes_s"] == pytest.approx(2e6, rel=0.05)
    assert sorted(f.units("w2@h")) == [21, 22]
    f.idle("w2@h", 21, converted=True)
    w2 = f.workers()[1]
    assert [u["slot"] for u in w2["converting"]] == [22] and w2["shards_done"] == "1"
    f.heartbeat("w2@h", "h", 12, "cuda", 100.0, 3, gone=[22])  # its process died mid-unit
    assert f.workers()[1]["converting"] == [] and f.workers()[1]["shards_done"] == "1"
    later = fleet.time.time() + fleet.ALIVE_S + 1
    monkeypatch.setattr(fleet.time, "time", lambda: later)
    assert [w["alive"] for w in f.workers()] == [False, False]  # silent: listed, not alive
    monkeypatch.setattr(fleet.time, "time", lambda: later + fleet.FORGET_AFTER_S)
    assert f.workers() == []
