"""The workers as the job store sees them: who is alive, on which host and device, converting what.

Each Celery worker keeps one Redis hash, ``recast:worker:<name>``: its parent process writes host, pid
and device with every heartbeat (``worker.celery_app``), and the process converting a shard adds the
job, the shard, its bytes and throughput from the progress callback it already has (``worker.jobs``),
at most every ``PROGRESS_EVERY_S``. The hash expires ``FORGET_AFTER_S`` after the last write, so a dead
worker is listed as not alive for a while, then disappears; the heartbeat's sorted set (``WORKERS_KEY``,
which ``/readyz`` and the metrics count) says who is alive.

Why not Celery's remote control (``inspect().active()``, ``stats()``): a broadcast waits its whole
timeout for replies on every call, from every API replica; a busy prefork worker answers late or not
at all; a dead one just does not answer, so nothing could say when it was last seen. Here a read is
two Redis round trips, the workers write what they know anyway, and the figures outlive the process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from core.jobstore import PREFIX, WORKERS_KEY

ALIVE_S = 30  # a heartbeat this recent means alive (the heartbeat comes every 10 s)
FORGET_AFTER_S = 15 * 60  # a worker silent this long is no longer listed
_CURRENT = ("job_id", "shard", "shard_started_at", "shard_bytes", "throughput")


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


@dataclass
class Fleet:
    r: redis.Redis  # decode_responses=True

    def heartbeat(self, name: str, host: str, pid: int, device: str, started_at: float) -> None:
        """The worker is alive: its sorted-set score and its hash's facts, refreshed together."""
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(WORKERS_KEY, {name: now})
        pipe.hset(worker_key(name), mapping={
            "name": name, "host": host, "pid": pid, "started_at": f"{started_at:.3f}", "heartbeat_at": f"{now:.3f}",
        })  # fmt: skip
        pipe.hsetnx(worker_key(name), "device", device)  # the converting process names it more exactly
        pipe.expire(worker_key(name), FORGET_AFTER_S)
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - FORGET_AFTER_S)
        pipe.execute()

    def working(
        self, name: str, job_id: str, shard: str, started_at: float, shard_bytes: int, device: str
    ) -> None:
        """``name`` is converting ``shard`` of ``job_id``: source bytes read so far and their rate."""
        elapsed = max(time.time() - started_at, 1e-3)
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(worker_key(name), mapping={
            "job_id": job_id, "shard": shard, "shard_started_at": f"{started_at:.3f}", "shard_bytes": shard_bytes,
            "throughput": f"{shard_bytes / elapsed:.1f}", "device": device,
        })  # fmt: skip
        pipe.expire(worker_key(name), FORGET_AFTER_S)
        pipe.execute()

    def idle(self, name: str, converted: bool) -> None:
        """The unit is over (``converted``: a shard, recorded); the worker takes the next task."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hdel(worker_key(name), *_CURRENT)
        if converted:
            pipe.hincrby(worker_key(name), "shards_done", 1)
        pipe.expire(worker_key(name), FORGET_AFTER_S)
        pipe.execute()

    def workers(self) -> list[dict[str, Any]]:
        """Every worker heard from in the last ``FORGET_AFTER_S``, by name, with ``alive`` set."""
        now = time.time()
        names = self.r.zrangebyscore(WORKERS_KEY, now - FORGET_AFTER_S, "+inf")
        pipe = self.r.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(worker_key(name))
        out = []
        for rec in pipe.execute():
            if not rec:
                continue
            rec["alive"] = now - float(rec.get("heartbeat_at") or 0) <= ALIVE_S
            out.append(rec)
        return sorted(out, key=lambda w: w["name"])
