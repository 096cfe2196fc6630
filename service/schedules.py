"""Schedules: a cron expression plus a job template whose source is "the newest matching checkpoint".

Our record (a Redis hash per schedule, firings in a capped list) is the source of truth; each schedule
is mirrored into a celery-redbeat entry, so any number of ``recast beat`` processes may run (redbeat
holds a lock) and the beat fires ``recast.fire_schedule`` with the schedule id only. A firing submits a
job unless that source revision was already converted with the same options.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from celery.schedules import crontab
from redbeat import RedBeatSchedulerEntry

from core import metrics
from core.jobstore import PREFIX, JobStore
from core.settings import Settings
from service.schemas import JobRequest, ScheduleTemplate
from service.submission import SendTask, create_job
from worker.engine.errors import RecastError
from worker.stores import parse_location
from worker.stores.newest import newest_checkpoint

FIRINGS_KEPT = 200
TASK = "recast.fire_schedule"
# Without a source_pattern, every checkpoint directory under a prefix counts; hidden ones (a target's
# staging area beside its final directory) never do.
EVERY_DIRECTORY = "[!.]*"


def parse_cron(expr: str) -> crontab:
    """Five fields: minute hour day-of-month month day-of-week, as in crontab(5)."""
    fields = expr.split()
    if len(fields) != 5:
        raise RecastError(
            f"cron: expected 5 fields (minute hour day month weekday), got {len(fields)} in {expr!r}"
        )
    try:
        return crontab(*fields[:2], day_of_month=fields[2], month_of_year=fields[3], day_of_week=fields[4])
    except (ValueError, TypeError) as exc:
        raise RecastError(f"cron: {expr!r} is not a valid expression ({exc})") from None


def next_run(expr: str, now: datetime | None = None) -> datetime:
    """The next fire time after ``now``, exactly. Not ``now + remaining_estimate(now)``: that subtracts
    celery's own clock, read a moment later, and showed a 03:00 cron as due at 02:59:59."""
    start, ends_in, _ = parse_cron(expr).remaining_delta(now or datetime.now(UTC))
    return start + ends_in


@dataclass
class ScheduleStore:
    store: JobStore
    celery: Celery

    @property
    def r(self):
        return self.store.r

    @staticmethod
    def key(sid: str, part: str = "") -> str:
        return f"{PREFIX}schedule:{sid}" + (f":{part}" if part else "")

    def _entry(self, rec: dict[str, Any]) -> RedBeatSchedulerEntry:
        return RedBeatSchedulerEntry(
            f"recast-schedule-{rec['id']}", TASK, parse_cron(rec["cron"]), args=[rec["id"]], app=self.celery,
            enabled=not rec["paused"],
        )  # fmt: skip

    def create(self, name: str, cron: str, template: ScheduleTemplate, paused: bool) -> dict[str, Any]:
        parse_cron(cron)
        sid = f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(3)}"
        rec = {"id": sid, "name": name, "cron": cron, "template": template.model_dump(), "paused": paused,
               "created_at": time.time()}  # fmt: skip
        self._save(rec)
        self.r.zadd(f"{PREFIX}schedules", {sid: 0})
        return self.view(rec)

    def _save(self, rec: dict[str, Any]) -> None:
        self.r.set(self.key(rec["id"]), json.dumps(rec))
        self._entry(rec).save()

    def get_raw(self, sid: str) -> dict[str, Any] | None:
        raw = self.r.get(self.key(sid))
        return json.loads(raw) if raw else None

    def update(self, sid: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        rec = self.get_raw(sid)
        if rec is None:
            return None
        if "cron" in changes:
            parse_cron(changes["cron"])
        rec.update(changes)
        self._save(rec)
        return self.view(rec)

    def delete(self, sid: str) -> bool:
        rec = self.get_raw(sid)
        if rec is None:
            return False
        self._entry(rec).delete()
        self.r.delete(self.key(sid), self.key(sid, "firings"), self.key(sid, "converted"))
        self.r.zrem(f"{PREFIX}schedules", sid)
        return True

    def list(self) -> list[dict[str, Any]]:
        ids = self.r.zrevrangebylex(f"{PREFIX}schedules", "+", "-")
        return [self.view(rec) for sid in ids if (rec := self.get_raw(sid))]

    def firings(self, sid: str) -> list[dict[str, Any]]:
        return [json.loads(f) for f in self.r.lrange(self.key(sid, "firings"), 0, -1)]

    def view(self, rec: dict[str, Any]) -> dict[str, Any]:
        last = self.r.lindex(self.key(rec["id"], "firings"), 0)
        return {
            **rec,
            "created_at": datetime.fromtimestamp(rec["created_at"], UTC).isoformat(),
            "next_run_at": None if rec["paused"] else next_run(rec["cron"]).isoformat(),
            "last_run_at": json.loads(last)["at"] if last else None,
        }

    def _record(self, sid: str, firing: dict[str, Any]) -> dict[str, Any]:
        pipe = self.r.pipeline()
        pipe.lpush(self.key(sid, "firings"), json.dumps(firing))
        pipe.ltrim(self.key(sid, "firings"), 0, FIRINGS_KEPT - 1)
        pipe.execute()
        outcome = "submitted" if firing["job_id"] and not firing["skipped_reason"] else (
            "failed" if firing.get("error") else "skipped")  # fmt: skip
        metrics.count(self.r, f"firings_{outcome}")
        return firing

    def fire(
        self, sid: str, settings: Settings, send_task: SendTask, manual: bool = False
    ) -> dict[str, Any] | None:
        """Resolve the newest source and submit a job, unless that revision was converted already."""
        rec = self.get_raw(sid)
        if rec is None:
            return None
        at = datetime.now(UTC).isoformat()
        firing: dict[str, Any] = {"at": at, "manual": manual, "job_id": None, "skipped_reason": None,
                                  "source": None, "source_revision": None, "error": None,
                                  "error_code": None}  # fmt: skip
        if rec["paused"] and not manual:
            return self._record(sid, {**firing, "skipped_reason": "paused"})
        tpl = ScheduleTemplate.model_validate(rec["template"])
        try:
            loc = parse_location(tpl.source, "template.source", settings.stores)
            pattern = tpl.source_pattern or EVERY_DIRECTORY
            newest = newest_checkpoint(loc, pattern, settings.stores, tpl.source_credential)
            firing.update(source=newest.url, source_revision=newest.revision)
            target = tpl.target.format(name=newest.name, revision=_short(newest.revision))
            fields = tpl.model_dump(exclude={"source_pattern"})
            fields.update(source=newest.url, target=target, labels={**tpl.labels, "schedule": sid})
            body = JobRequest.model_validate(fields)
            options = {k: v for k, v in body.model_dump().items() if k not in ("source", "labels")}
            digest = hashlib.sha256(
                json.dumps([newest.url, newest.revision, options], sort_keys=True).encode()
            )
            converted = self.key(sid, "converted")
            previous = self.r.hget(converted, digest.hexdigest())
            if previous and self._still_counts(previous):
                return self._record(sid, {**firing, "job_id": previous,
                                          "skipped_reason": "this source revision was already converted"})  # fmt: skip
            job = create_job(self.store, settings, send_task, body)
            self.r.hset(converted, digest.hexdigest(), job["id"])
            return self._record(sid, {**firing, "job_id": job["id"]})
        except RecastError as exc:  # refusals too: a firing is refused for what a submission would be
            return self._record(sid, {**firing, "error": str(exc), "error_code": exc.code})

    def _still_counts(self, job_id: str) -> bool:
        """A conversion that failed or was cancelled does not count: the next firing tries again."""
        job = self.store.get(job_id)
        return job is None or job["state"] not in ("failed", "cancelled")


def _short(revision: str) -> str:
    return revision.rsplit("@", 1)[-1][:12]
