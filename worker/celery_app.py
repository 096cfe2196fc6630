"""The Celery app, configured for long GPU work on a Redis broker (PITFALLS: Celery with long tasks).

- Late acks with reject-on-worker-lost: a worker that dies mid-shard gives the shard back, and our
  own attempt counter (Redis) fails the job when one unit keeps killing its worker.
- Prefetch 1: a process reserves only the task it runs, so idle workers take the other shards.
- The visibility timeout is above the hard time limit, or the broker would hand a running shard to a
  second worker. Tasks keep running through a broker restart (see below) and publish with retries.
  No result backend: the job store is the only record, with its own shard ledger.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import warnings

from celery import Celery, signals
from celery.exceptions import SecurityWarning

from service.jobstore import WORKERS_KEY
from service.settings import QUEUE, Settings

HEARTBEAT_S = 10
# Content types that deserialize to code; with any of them a root worker is a real risk.
UNSAFE_CONTENT = {"pickle", "application/x-python-serialize", "application/group-python-serialize"}
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
    app.conf.include = ["worker.tasks"]
    return app


app = make_app()


def _heartbeat(url: str, name: str) -> None:
    """Tell /readyz a worker is alive: a score per worker in one sorted set, refreshed in the background."""
    import redis

    r = redis.Redis.from_url(url)
    while True:
        with contextlib.suppress(redis.RedisError):
            r.zadd(WORKERS_KEY, {name: time.time()})
        time.sleep(HEARTBEAT_S)


@signals.worker_ready.connect
def _start_heartbeat(sender=None, **_: object) -> None:
    settings = Settings.from_env()
    if settings.redis_url:
        name = getattr(sender, "hostname", None) or f"{socket.gethostname()}-{os.getpid()}"
        threading.Thread(target=_heartbeat, args=(settings.redis_url, name), daemon=True).start()


@signals.celeryd_init.connect
def _root_without_pickle(conf=None, **_: object) -> None:
    """Celery warns at start whenever a worker runs as root (a container, ``recast up`` as root). The
    danger it means is pickle: anyone who can write to the broker could run code as root. This worker
    accepts JSON only, for which Celery itself merely warns (with pickle it refuses to start), so that one
    warning is acknowledged here, and only while no unsafe content type is accepted. Every other warning
    still shows."""
    if conf is not None and not UNSAFE_CONTENT & set(conf.accept_content or ()):
        warnings.filterwarnings(
            "ignore", message="You're running the worker with superuser privileges", category=SecurityWarning
        )
