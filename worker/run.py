"""``recast worker``: one Celery worker per visible GPU, or one on the CPU when there is none.

Each GPU gets its own worker with ``CUDA_VISIBLE_DEVICES`` set to it, so a process never sees another
process's device. A worker converts as many shards at once as the CLI (``RECAST_LANES``: 2 on a CPU, 3
on a GPU), one per process of its prefork pool: a shard alone leaves the disk and the cores half idle
(one shard at a time took 1.5x the CLI's time on 4 CPU cores), and processes rather than threads keep
Celery's time limits and the replacement of a killed child per shard.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys


def _gpu_count() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    import torch

    return torch.cuda.device_count()  # NVML-based: does not initialise CUDA in this parent process


def worker_argv(name: str, loglevel: str, concurrency: int, quiet: bool = False) -> list[str]:
    return [
        *(["--quiet"] if quiet else []), "worker", "--queues", "recast", "--pool", "prefork",
        "--concurrency", str(concurrency), "--hostname", f"{name}@{socket.gethostname()}", "--loglevel", loglevel,
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def run_worker(gpu: int | None = None, loglevel: str = "INFO", quiet: bool = False) -> int:
    """Run in this process for one device; fan out one child per GPU when several are visible."""
    gpus = _gpu_count() if gpu is None else 1
    if gpu is None and gpus > 1:
        children = []
        for i in range(gpus):
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(i))
            cmd = [sys.executable, "-m", "worker.cli", "worker", "--gpu", str(i), "--loglevel", loglevel]
            cmd += ["--quiet"] if quiet else []
            children.append(subprocess.Popen(cmd, env=env))
        signal.signal(signal.SIGTERM, lambda *_: [c.terminate() for c in children])
        try:
            return max(c.wait() for c in children)
        except KeyboardInterrupt:
            for c in children:
                c.terminate()
            return max(c.wait() for c in children)
    from worker.celery_app import app
    from worker.engine.pipeline import lanes

    name = f"recast-gpu{gpu}" if gpu is not None else ("recast-gpu0" if gpus else "recast-cpu")
    app.worker_main(worker_argv(f"{name}-{os.getpid()}", loglevel, lanes("cuda" if gpus else "cpu"), quiet))
    return 0
