"""The workers' Celery app: the shared configuration (``core.queue``) plus what only a worker does,
its heartbeat for ``/readyz`` and its start-up checks."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import warnings
from typing import Any

from celery import signals
from celery.exceptions import SecurityWarning

from core.fleet import Fleet
from core.queue import make_app
from core.settings import Settings

HEARTBEAT_S = 10
# Content types that deserialize to code; with any of them a root worker is a real risk.
UNSAFE_CONTENT = {"pickle", "application/x-python-serialize", "application/group-python-serialize"}


app = make_app()


def _device() -> str:
    """The device this worker converts on, as far as the parent process can tell without initialising
    CUDA (the process converting a shard names the GPU itself)."""
    import torch

    if not torch.cuda.device_count():  # NVML-based, as in worker.run
        return "cpu"
    return f"cuda (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'all')})"


def _heartbeat(url: str, name: str, pool: Any) -> None:
    """Tell /readyz and the Workers page a worker is alive (``core.fleet``), refreshed in the background.
    A pool process that died mid-unit cannot clear its unit; the parent, which knows its live pool
    processes (``pool.info``, as ``celery inspect stats`` reports them), clears it."""
    import redis

    fleet = Fleet(redis.Redis.from_url(url, decode_responses=True))
    host, pid, started, device = socket.gethostname(), os.getpid(), time.time(), _device()
    while True:
        with contextlib.suppress(redis.RedisError):
            recorded = fleet.units(name)  # before the live list: a unit recorded now has a live process
            info = _pool_info(pool)
            live = info.get("processes")
            gone = set(recorded) - set(live) if live is not None else set()
            fleet.heartbeat(name, host, pid, device, started, int(info.get("max-concurrency", 1)), gone)
        time.sleep(HEARTBEAT_S)


def _pool_info(pool: Any) -> dict[str, Any]:
    """The pool's processes and size, or nothing while the pool is starting or stopping (its process
    list is then unset): the heartbeat must go on, and must not clear a live process's unit."""
    try:
        return pool.info
    except (AttributeError, TypeError):
        return {}


@signals.worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: object) -> None:
    """``sender``: the worker's consumer, holding its hostname and its pool."""
    settings = Settings.from_env()
    if settings.redis_url:
        name = sender.hostname
        threading.Thread(target=_heartbeat, args=(settings.redis_url, name, sender.pool), daemon=True).start()


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
