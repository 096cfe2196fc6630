"""The Celery app's configuration: one queue for the API, the beat and the workers alike.

The API and the beat only send tasks by name; the workers (``worker/celery_app.py``) run them. Keeping
the configuration here lets all three share it without the API importing the workers.

- Late acks with reject-on-worker-lost: a worker that dies mid-shard gives the shard back, and our
  own attempt counter (Redis) fails the job when one unit keeps killing its worker.
- Prefetch 1: a process reserves only the task it runs, so idle workers take the other shards.
- The visibility timeout is above the hard time limit, or the broker would hand a running shard to a
  second worker. Tasks keep running through a broker restart (see below) and publish with retries.
  No result backend: the job store is the only record, with its own shard ledger.
"""

from __future__ import annotations

from celery import Celery

from core.settings import QUEUE, Settings

SWEEP_EVERY_S = 60.0  # how often the beat looks for jobs recorded but never queued


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    app = Celery("recast", broker=settings.broker_url() if settings.redis_url else None)
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_time_limit=settings.shard_time_limit_s,
        task_soft_time_limit=max(settings.shard_time_limit_s - 60, 1),
        worker_prefetch_multiplier=1,
        # A Redis restart must not strand a running shard. Redis hands an unacknowledged task to another
        # worker only after the visibility timeout (hours), so a task cancelled on connection loss would
        # sit unrun that long; instead it runs on (the job store's client retries through the restart),
        # records its shard, and its late ack, lost with the old connection, at worst re-runs the task
        # hours later, which finds the shard in the ledger and does nothing.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_publish_retry_policy={
            "max_retries": 40,
            "interval_start": 0.1,
            "interval_step": 0.5,
            "interval_max": 2,
        },
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        visibility_timeout=settings.visibility_timeout_s,
        worker_hijack_root_logger=False,
        task_serializer="json",
        beat_scheduler="redbeat.RedBeatScheduler",
        redbeat_redis_url=settings.redis_url,
        redbeat_key_prefix="recast:redbeat:",
        redbeat_redis_options={},
        redbeat_lock_timeout=60,
        beat_max_loop_interval=10,
        accept_content=["json"],
    )
    # Static beat entries (celery-redbeat stores them in Redis like the schedules' own).
    app.conf.beat_schedule = {"recast-sweep": {"task": "recast.sweep", "schedule": SWEEP_EVERY_S}}
    app.conf.include = ["worker.tasks", "service.tasks"]
    return app
