"""The one task the service layer owns: a schedule's firing, sent by the beat with the schedule id only.

Firing a schedule creates a job exactly as ``POST /v1/jobs`` does (``service.submission``), so it lives
with the API's code; worker processes run it because the beat sends it to the shared queue, and they
load it by name (``core.queue`` lists it), so the worker package never imports the service.
"""

from __future__ import annotations

from functools import cache

from celery import current_app, shared_task

from core.jobstore import JobStore
from core.settings import Settings
from service.schedules import ScheduleStore


@cache
def _schedules() -> tuple[ScheduleStore, Settings]:
    settings = Settings.from_env()
    return ScheduleStore(JobStore.from_settings(settings), current_app._get_current_object()), settings


@shared_task(name="recast.fire_schedule")
def fire_schedule(schedule_id: str) -> None:
    """Sent by the beat (celery-redbeat) at each cron time."""
    store, settings = _schedules()
    store.fire(schedule_id, settings, lambda name, args: store.celery.send_task(name, args=args))
