"""The workers as the job store sees them: who is alive, on which host and device, converting what.

Each Celery worker keeps one Redis hash, ``recast:worker:<name>``: its parent process writes host, pid,
device and pool size with every heartbeat (``worker.celery_app``), and each pool process converting a
unit adds one field, ``unit:<its pid>``, holding the job, the shard, its bytes and throughput from the
progress callback it already has (``worker.jobs``), at most every ``PROGRESS_EVERY_S``. A worker runs
as many pool processes as the CLI runs lanes, so one worker may be converting several shards at once.
The hash expires ``FORGET_AFTER_S`` after the last write, so a dead worker is listed as not alive for a
while, then disappears; the heartbeat's sorted set (``WORKERS_KEY``, which ``/readyz`` and the metrics
count) says who is alive.

Why not Celery's remote control (``inspect().active()``, ``stats()``): a broadcast waits its whole
timeout for replies on every call, from every API replica; a busy prefork worker answers late or not
at all; a dead one just does not answer, so nothing could say when it was last seen. Here a read is
two Redis round trips, the workers write what they know anyway, and the figures outlive the process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from core.jobstore import PREFIX, WORKERS_KEY

ALIVE_S = 30  # a heartbeat this recent means alive (the heartbeat comes every 10 s)
FORGET_AFTER_S = 15 * 60  # a worker silent this long is no longer listed
UNIT = "unit:"  # field prefix of a pool process's current unit, followed by its pid


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


@dataclass
class Fleet:
    r: redis.Redis  # decode_responses=True

    def heartbeat(
        self,
        name: str,
        host: str,
        pid: int,
        device: str,
        started_at: float,
        slots: int,
        gone: Iterable[int] = (),
    ) -> None:
        """The worker is alive: its sorted-set score and its hash's facts, refreshed together. ``gone``:
        pool processes that died mid-unit (killed, out of memory), whose unit nobody else would clear."""
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(WORKERS_KEY, {name: now})
        pipe.hset(worker_key(name), mapping={
            "name": name, "host": host, "pid": pid, "started_at": f"{started_at:.3f}", "heartbeat_at": f"{now:.3f}",
            "slots": slots,
        })  # fmt: skip
        for child in gone:
            pipe.hdel(worker_key(name), f"{UNIT}{child}")
        pipe.hsetnx(worker_key(name), "device", device)  # the converting process names it more exactly
        pipe.expire(worker_key(name), FORGET_AFTER_S)
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - FORGET_AFTER_S)
        pipe.execute()

    def units(self, name: str) -> list[int]:
        """The pids of ``name``'s pool processes that have a unit on record."""
        return [int(f[len(UNIT) :]) for f in self.r.hkeys(worker_key(name)) if f.startswith(UNIT)]

    def working(
        self, name: str, slot: int, job_id: str, shard: str, started_at: float, shard_bytes: int, device: str
    ) -> None:
        """Pool process ``slot`` of ``name`` is converting ``shard`` of ``job_id``: source bytes read so
        far and their rate."""
        elapsed = max(time.time() - started_at, 1e-3)
        unit = {"job_id": job_id, "shard": shard, "started_at": round(started_at, 3), "bytes_in": shard_bytes,
                "throughput_bytes_s": round(shard_bytes / elapsed, 1)}  # fmt: skip
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(worker_key(name), mapping={f"{UNIT}{slot}": json.dumps(unit), "device": device})
        pipe.expire(worker_key(name), FORGET_AFTER_S)
        pipe.execute()

    def idle(self, name: str, slot: int, converted: bool) -> None:
        """Pool process ``slot``'s unit is over (``converted``: a shard, recorded); it takes the next task."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hdel(worker_key(name), f"{UNIT}{slot}")
        if converted:
            pipe.hincrby(worker_key(name), "shards_done", 1)
        pipe.expire(worker_key(name), FORGET_AFTER_S)
        pipe.execute()

    def workers(self) -> list[dict[str, Any]]:
        """Every worker heard from in the last ``FORGET_AFTER_S``, by name, with ``alive`` set and its
        units as ``converting``: ``{"slot": pid, "job_id", "shard", "started_at", "bytes_in",
        "throughput_bytes_s"}`` each, oldest first."""
        now = time.time()
        names = self.r.zrangebyscore(WORKERS_KEY, now - FORGET_AFTER_S, "+inf")
        pipe = self.r.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(worker_key(name))
        out = []
        for rec in pipe.execute():
            if not rec:
                continue
            units = [
                {"slot": int(f[len(UNIT) :]), **json.loads(rec.pop(f))}
                for f in list(rec)
                if f.startswith(UNIT)
            ]
            rec["converting"] = sorted(units, key=lambda u: (u["started_at"], u["slot"]))
            rec["alive"] = now - float(rec.get("heartbeat_at") or 0) <= ALIVE_S
            out.append(rec)
        return sorted(out, key=lambda w: w["name"])
