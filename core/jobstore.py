"""Jobs in Redis: one hash per job, atomic transitions, an event stream per job, indexes for listing.

Every change of state or progress is one Lua script, so it checks the state it expects, writes the
record, moves the job between the state indexes and appends the event in one step: API and workers
can die at any moment and a job is never half-updated. Events go to a Redis stream (not pub/sub), so
a client that reconnects with ``Last-Event-ID`` misses nothing. Finished jobs expire; the listing
indexes drop expired ids lazily when they meet them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from core.settings import Settings
from core.states import STATES, TERMINAL

PREFIX = "recast:"
EVENTS_MAXLEN = 10_000
WORKERS_KEY = f"{PREFIX}workers"  # worker name -> time of its last heartbeat
_JSON_FIELDS = ("request", "labels", "result", "shard_names")
_INT_FIELDS = ("shards_total", "shards_done", "ledger_total", "bytes_total", "bytes_in", "bytes_out")
# Retries of a Redis command whose connection failed (backoff capped at 2 s: about a minute in all).
RECONNECT_TRIES = 40

# KEYS: job hash, events, state-index prefix, then the per-job keys that expire with it.
# ARGV: allowed states (space separated), new state, ttl (0 keeps), event type, field/value pairs…
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
local ok = false
for s in string.gmatch(ARGV[1], '%S+') do if s == cur then ok = true end end
if not ok then return {0, cur} end
redis.call('HSET', KEYS[1], 'state', ARGV[2])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('ZREM', KEYS[3] .. cur, id)
redis.call('ZADD', KEYS[3] .. ARGV[2], 0, id)
local snap = redis.call('HGETALL', KEYS[1])
local m = {}
for i = 1, #snap, 2 do m[snap[i]] = snap[i + 1] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', MAXLEN_N, '*', 'type', ARGV[4], 'data', cjson.encode(m))
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  for i = 1, #KEYS do if i ~= 3 then redis.call('EXPIRE', KEYS[i], ttl) end end
end
return {1, cur}
""".replace("MAXLEN_N", str(EVENTS_MAXLEN))

# Throughput over time: a sample (time, bytes_in) at most every THROUGHPUT_EVERY_S, and when the ledger
# completes. When a job has more than THROUGHPUT_POINTS samples every other one is dropped and the interval
# doubled, so a job of any length keeps its whole history in a bounded list; the job hash holds the latest
# rate.
THROUGHPUT_EVERY_S = 2
THROUGHPUT_POINTS = 240

# KEYS: job hash, events, ledger, throughput samples. ARGV: step, bytes_in increment, ledger entry name
# ('' if none), its json, bytes_out, now, '1' if the entry is a shard. Progress counts only while the job
# is active; a shard is counted once however often it is redone. The ledger is complete at
# ``ledger_total`` entries (the shards and the metadata), or ``shards_total`` for a job planned before
# ``ledger_total`` existed (it is 0 then).
_PROGRESS = (
    """
local cur = redis.call('HGET', KEYS[1], 'state')
if cur ~= 'running' and cur ~= 'verifying' and cur ~= 'uploading' then return {0, 0} end
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'step', ARGV[1]) end
redis.call('HINCRBY', KEYS[1], 'bytes_in', tonumber(ARGV[2]))
local complete = 0
if ARGV[3] ~= '' then
  if redis.call('HSETNX', KEYS[3], ARGV[3], ARGV[4]) == 1 and ARGV[7] == '1' then
    redis.call('HINCRBY', KEYS[1], 'shards_done', 1)
    redis.call('HINCRBY', KEYS[1], 'bytes_out', tonumber(ARGV[5]))
  end
  local total = tonumber(redis.call('HGET', KEYS[1], 'ledger_total') or '0')
  if total == 0 then total = tonumber(redis.call('HGET', KEYS[1], 'shards_total')) end
  if redis.call('HLEN', KEYS[3]) == total then complete = 1 end
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[6])
local now = tonumber(ARGV[6])
local last = tonumber(redis.call('HGET', KEYS[1], 'throughput_at') or '0')
local every = tonumber(redis.call('HGET', KEYS[1], 'throughput_every') or 'EVERY_S')
if complete == 1 or now - last >= every then
  local read = tonumber(redis.call('HGET', KEYS[1], 'bytes_in'))
  local before = tonumber(redis.call('HGET', KEYS[1], 'throughput_bytes') or '0')
  if last == 0 then
    last = tonumber(redis.call('HGET', KEYS[1], 'started_at') or ARGV[6])
    redis.call('RPUSH', KEYS[4], tostring(last) .. ' 0')
  end
  if now > last then
    redis.call('HSET', KEYS[1], 'throughput', tostring((read - before) / (now - last)))
  end
  redis.call('HSET', KEYS[1], 'throughput_at', ARGV[6], 'throughput_bytes', tostring(read))
  redis.call('RPUSH', KEYS[4], ARGV[6] .. ' ' .. tostring(read))
  if redis.call('LLEN', KEYS[4]) > POINTS_N then
    local all = redis.call('LRANGE', KEYS[4], 0, -1)
    local keep = {}
    for i = 1, #all, 2 do keep[#keep + 1] = all[i] end
    if #all % 2 == 0 then keep[#keep + 1] = all[#all] end
    redis.call('DEL', KEYS[4])
    redis.call('RPUSH', KEYS[4], unpack(keep))
    redis.call('HSET', KEYS[1], 'throughput_every', tostring(every * 2))
  end
end
local snap = redis.call('HGETALL', KEYS[1])
local m = {}
for i = 1, #snap, 2 do m[snap[i]] = snap[i + 1] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', MAXLEN_N, '*', 'type', 'progress', 'data', cjson.encode(m))
return {1, complete}
""".replace("MAXLEN_N", str(EVENTS_MAXLEN))
    .replace("EVERY_S", str(THROUGHPUT_EVERY_S))
    .replace("POINTS_N", str(THROUGHPUT_POINTS))
)


# KEYS: one key. ARGV: expected value, new value, ttl. Compare-and-set.
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
return 1
"""


class Conflict(Exception):
    """A transition found the job in another state than it expected."""

    def __init__(self, job_id: str, state: str):
        super().__init__(f"job {job_id} is {state or 'gone'}")
        self.state = state


_last_id = [0, 0]  # (milliseconds, random part) of this process's newest id
_id_lock = threading.Lock()


def new_id() -> str:
    """Sortable by creation time as text, so the listing index pages by id alone (newest first).

    Two ids of one millisecond would sort by their random parts, so within a process the later one takes
    the earlier's random part plus one instead (as monotonic ULIDs do): jobs one client submits in a burst
    list in the order they were made. Across API replicas, one millisecond's ids sort arbitrarily.
    """
    ms = time.time_ns() // 1_000_000
    with _id_lock:
        last_ms, last_rand = _last_id
        if ms > last_ms:
            rand = secrets.randbits(31)  # room for 2**31 more ids in this millisecond
        elif last_rand < 0xFFFFFFFF:
            ms, rand = last_ms, last_rand + 1
        else:
            ms, rand = last_ms + 1, 0
        _last_id[:] = [ms, rand]
    return f"{ms:012x}{rand:08x}"


def _now() -> str:
    return f"{time.time():.3f}"


@dataclass
class JobStore:
    r: redis.Redis
    ttl_s: int = 7 * 24 * 3600

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        return cls.connect(settings.required_redis_url(), settings.job_ttl_s)

    @classmethod
    def connect(cls, url: str, ttl_s: int = 7 * 24 * 3600) -> JobStore:
        """A client that rides out a Redis restart (up to ~a minute of retries with backoff), so a
        shard in progress when Redis restarts still records its result instead of failing the job."""
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), RECONNECT_TRIES),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        return cls(client, ttl_s)

    # ------------------------------------------------------------------------------------------- keys

    @staticmethod
    def key(job_id: str, part: str = "") -> str:
        return f"{PREFIX}job:{job_id}" + (f":{part}" if part else "")

    def _job_keys(self, job_id: str) -> list[str]:
        k = self.key
        return [k(job_id), k(job_id, "events"), f"{PREFIX}jobs:state:", k(job_id, "shards"),
                k(job_id, "attempts"), k(job_id, "report"), k(job_id, "throughput")]  # fmt: skip

    # ------------------------------------------------------------------------------------------ write

    def create(self, request: dict[str, Any], labels: dict[str, str], revision: str | None) -> dict[str, Any]:
        # An id is taken before the record is written: two API replicas' ids of one millisecond may meet.
        job_id = new_id()
        while not self.r.hsetnx(self.key(job_id), "id", job_id):
            job_id = new_id()
        now = _now()
        record = {
            "id": job_id,
            "state": "queued",
            "created_at": now,
            "updated_at": now,
            "request": json.dumps(request, sort_keys=True),
            "labels": json.dumps(labels, sort_keys=True),
            "source_revision": revision or "",
            "step": "queued",
            **{f: 0 for f in _INT_FIELDS},
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.key(job_id), mapping=record)
        pipe.zadd(f"{PREFIX}jobs:all", {job_id: 0})
        pipe.zadd(f"{PREFIX}jobs:state:queued", {job_id: 0})
        for k, v in labels.items():
            pipe.zadd(f"{PREFIX}jobs:label:{k}={v}", {job_id: 0})
        pipe.xadd(
            self.key(job_id, "events"), {"type": "state", "data": json.dumps(record)}, maxlen=EVENTS_MAXLEN
        )
        pipe.execute()
        return self.get(job_id) or {}

    def transition(self, job_id: str, allowed: Iterable[str], state: str, **fields: Any) -> str:
        """Move to ``state`` if the job is in one of ``allowed``; returns the previous state."""
        fields.setdefault("updated_at", _now())
        if state in TERMINAL:
            fields.setdefault("finished_at", fields["updated_at"])
        if state == "running":
            fields.setdefault("started_at", fields["updated_at"])
        args = [" ".join(allowed), state, str(self.ttl_s if state in TERMINAL else 0), "state"]
        for k, v in fields.items():
            args += [k, json.dumps(v, sort_keys=True) if k in _JSON_FIELDS else str(v)]
        done, prev = self.r.eval(_TRANSITION, len(self._job_keys(job_id)), *self._job_keys(job_id), *args)
        if not done:
            raise Conflict(job_id, prev)
        return prev

    def set_fields(self, job_id: str, **fields: Any) -> None:
        """Fields that are facts rather than progress (plan results); no event of their own."""
        mapping = {
            k: json.dumps(v, sort_keys=True) if k in _JSON_FIELDS else str(v) for k, v in fields.items()
        }
        self.r.hset(self.key(job_id), mapping=mapping)

    def progress(
        self,
        job_id: str,
        step: str = "",
        bytes_in: int = 0,
        shard: str = "",
        sha256: str = "",
        size: int = 0,
        is_shard: bool = True,
        **entry_fields: Any,
    ) -> bool:
        """Record progress; with ``shard``, mark that ledger entry done (its SHA-256, size, and whatever
        else finalize needs: the target's receipt, the verification). ``is_shard=False`` for an entry that
        is not a weight shard (the metadata), which the shard counters leave out. True when the ledger is
        complete."""
        keys = [self.key(job_id), self.key(job_id, "events"), self.key(job_id, "shards"),
                self.key(job_id, "throughput")]  # fmt: skip
        worker = f"{os.uname().nodename}:{os.getpid()}"
        fields = {"sha256": sha256, "size": size, "worker": worker, **entry_fields}
        entry = json.dumps(fields) if shard else ""
        flag = "1" if is_shard else "0"
        _, complete = self.r.eval(
            _PROGRESS, len(keys), *keys, step, bytes_in, shard, entry, size, _now(), flag
        )
        return bool(complete)

    def mark_enqueued(self, job_id: str) -> None:
        """The job's planning task is on the queue: the sweep leaves it alone from now on."""
        self.r.hset(self.key(job_id), "enqueued_at", _now())

    def stranded(self, older_than_s: float) -> list[str]:
        """Queued jobs recorded more than ``older_than_s`` ago whose planning task was never queued
        (the API died between recording the job and queueing it)."""
        out = []
        cutoff = time.time() - older_than_s
        for job_id in self.r.zrange(f"{PREFIX}jobs:state:queued", 0, -1):
            created, enqueued = self.r.hmget(self.key(job_id), "created_at", "enqueued_at")
            if created is not None and enqueued is None and float(created) <= cutoff:
                out.append(job_id)
        return out

    def shard_done(self, job_id: str, shard: str) -> bool:
        return bool(self.r.hexists(self.key(job_id, "shards"), shard))

    def ledger(self, job_id: str) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.r.hgetall(self.key(job_id, "shards")).items()}

    def attempt(self, job_id: str, unit: str, delta: int = 1) -> int:
        """Starts of ``unit`` that did not end: a unit that kills its worker every time must not loop."""
        return int(self.r.hincrby(self.key(job_id, "attempts"), unit, delta))

    def save_report(self, job_id: str, report: dict[str, Any]) -> None:
        self.r.set(self.key(job_id, "report"), json.dumps(report))

    def claim_idempotency(
        self, key: str, body_hash: str, job_id: str, replace: bool = False
    ) -> tuple[str, str] | None:
        """Bind ``key`` to a job; returns the (job, body hash) already bound to it, if any."""
        name = f"{PREFIX}idempotency:{key}"
        value = json.dumps({"job": job_id, "hash": body_hash})
        if self.r.set(name, value, nx=not replace, ex=self.ttl_s):
            return None
        raw = self.r.get(name)
        if raw is None:
            return self.claim_idempotency(key, body_hash, job_id)
        bound = json.loads(raw)
        return bound["job"], bound["hash"]

    def release_idempotency(self, key: str) -> None:
        self.r.delete(f"{PREFIX}idempotency:{key}")

    @staticmethod
    def _target_key(target: str) -> str:
        return f"{PREFIX}target:{hashlib.sha256(target.encode()).hexdigest()}"

    def target_holder(self, target: str) -> str | None:
        """The job writing to ``target`` now, if one is: the last to claim it, while it has not ended."""
        holder = self.r.get(self._target_key(target))
        if holder is None:
            return None
        rec = self.get(holder)
        return holder if rec is not None and rec["state"] not in TERMINAL else None

    def claim_target(self, job_id: str, target: str) -> str | None:
        """Make ``job_id`` the one job writing to ``target`` (its URL); returns the other job that is,
        if any. Two jobs writing one location would abort each other's uploads and publish a mixture. A
        claim lasts while its job has not ended: an ended job's claim is taken over, never released."""
        name = self._target_key(target)
        while True:
            if self.r.set(name, job_id, nx=True, ex=self.ttl_s):
                return None
            holder = self.r.get(name)
            if holder is None:
                continue
            if holder == job_id or (other := self.target_holder(target)) is None:
                if self.r.eval(_SWAP, 1, name, holder, job_id, self.ttl_s):
                    return None
                continue
            return other

    # ------------------------------------------------------------------------------------------- read

    def get(self, job_id: str) -> dict[str, Any] | None:
        return decode(self.r.hgetall(self.key(job_id))) or None

    def throughput(self, job_id: str) -> list[tuple[float, int]]:
        """The job's (time, source bytes read by then) samples, oldest first (see ``THROUGHPUT_EVERY_S``)."""
        out = []
        for raw in self.r.lrange(self.key(job_id, "throughput"), 0, -1):
            at, total = raw.split()
            out.append((float(at), int(float(total))))
        return out

    def report(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self.key(job_id, "report"))
        return json.loads(raw) if raw else None

    def events(self, job_id: str, after: str, block_ms: int) -> list[tuple[str, str, dict[str, Any]]]:
        """Events after stream id ``after`` ("0" for all), waiting up to ``block_ms`` for new ones."""
        got = self.r.xread({self.key(job_id, "events"): after}, count=100, block=block_ms)
        out = []
        for _, entries in got or []:
            for entry_id, fields in entries:
                out.append((entry_id, fields["type"], decode(json.loads(fields["data"]))))
        return out

    def list(
        self,
        state: str | None = None,
        label: tuple[str, str] | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first, keyset-paged by id; returns the page and the cursor of the next one."""
        if label:
            index = f"{PREFIX}jobs:label:{label[0]}={label[1]}"
        elif state:
            index = f"{PREFIX}jobs:state:{state}"
        else:
            index = f"{PREFIX}jobs:all"
        page: list[dict[str, Any]] = []
        top = f"({cursor}" if cursor else "+"
        while len(page) < limit:
            ids = self.r.zrevrangebylex(index, top, "-", start=0, num=limit * 2)
            if not ids:
                return page, None
            for job_id in ids:
                job = self.get(job_id)
                if job is None:
                    self.r.zrem(index, job_id)
                elif state is None or job["state"] == state:
                    page.append(job)
                    if len(page) == limit:
                        return page, job_id
            top = f"({ids[-1]}"
        return page, None

    def counts(self) -> dict[str, int]:
        pipe = self.r.pipeline()
        for s in STATES:
            pipe.zcard(f"{PREFIX}jobs:state:{s}")
        return dict(zip(STATES, pipe.execute(), strict=True))


def decode(raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(raw)
    for f in _JSON_FIELDS:
        if raw.get(f):
            out[f] = json.loads(raw[f])
    for f in _INT_FIELDS:
        if f in raw:
            out[f] = int(raw[f])
    return out
