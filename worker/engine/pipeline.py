"""Running a shard's work units so that reading, arithmetic, writing and hashing overlap.

The disk is the bottleneck of a conversion (a GPU dequantizes a hundred times faster than it reads),
so the only goal is to keep the disk busy reading and writing at once. Per shard: one thread reads
units ahead (bounded in bytes), the calling thread computes and verifies each unit as its bytes
arrive, and the shard's stream writes and hashes behind it. Several shards run side by side because
two files written at once go faster than one (PITFALLS: 1.74 vs 1.28 GB/s on the H200's disk), and
it spreads the CPU's arithmetic over its cores. Threads, not processes: the heavy work (reads,
writes, SHA-256, torch and numpy kernels) releases the GIL, and pieces pass between stages without
a copy. Nothing is pinned: pageable copies run far faster than the disk, and pinning gigabytes
costs seconds.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .shard_stream import ShardStream, Sink, Slot
from .timings import Timings

Read = tuple[str, int | None, int | None]
Fetched = dict[Read, torch.Tensor]
Piece = tuple[str, int, torch.Tensor]

# Shards produced at once by ``convert``. Two files written at once beat one on the H200's disk, and on
# the GPU a third lane keeps the disk fed while the others copy to and from the device (H200, 8.7 GB
# DeepSeek-shaped: 28.6 s with 3 lanes against 39.4 s with 2 and 29.2 s with 6). RECAST_LANES
# overrides it for disks and hosts that differ.
LANES = {"cpu": 2, "cuda": 3}


def lanes(device: str) -> int:
    value = os.environ.get("RECAST_LANES", "")
    return int(value) if value.isdigit() and int(value) > 0 else LANES[device]


@dataclass
class Unit:
    """One step of a shard: the source rows it needs, and how they become checked output pieces."""

    reads: list[Read]
    run: Callable[[Fetched], list[Piece]]
    bytes_in: int


def produce_shard(
    path: Path,
    header: bytes,
    slots: dict[str, Slot],
    units: Iterable[Unit],
    fetch: Callable[[list[Read]], Fetched],
    read_ahead: int,
    progress: Callable[[int], None],
    timings: Timings,
    release: Callable[[torch.Tensor], None] | None = None,
    sink: Sink | None = None,
) -> str:
    """Write one shard from its units, complete or not at all; returns its SHA-256.

    ``release`` takes back host buffers: a unit's reads once it has run, pieces once written. With a
    ``sink``, the bytes go there instead of to ``path`` (see ``shard_stream``).
    """
    stream = ShardStream(path, header, slots, timings, release, sink)

    def timed_fetch(reads: list[Read]) -> Fetched:
        with timings.timed("read"):
            return fetch(reads)

    try:
        for unit, fetched in _read_ahead(units, timed_fetch, read_ahead, timings):
            with timings.timed("compute"):
                pieces = unit.run(fetched)
            if release is not None:
                for t in fetched.values():
                    release(t)
            with timings.timed("wait for writer"):
                for key, row, piece in pieces:
                    stream.put(key, row, piece)
            progress(unit.bytes_in)
        with timings.timed("close (fsync)"):
            return stream.close()
    except BaseException:
        stream.abort()
        raise


def _read_ahead(
    units: Iterable[Unit], fetch: Callable[[list[Read]], Fetched], limit: int, timings: Timings
) -> Iterator[tuple[Unit, Fetched]]:
    """Yield units with their bytes, keeping up to ``limit`` bytes of later units being read."""
    pending: deque[tuple[Unit, Future]] = deque()
    queued = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="recast-read") as reader:
        try:
            for unit in units:
                while pending and queued + unit.bytes_in > limit:
                    done, fut = pending.popleft()
                    queued -= done.bytes_in
                    with timings.timed("wait for reader"):
                        got = fut.result()
                    yield done, got
                pending.append((unit, reader.submit(fetch, unit.reads)))
                queued += unit.bytes_in
            while pending:
                done, fut = pending.popleft()
                with timings.timed("wait for reader"):
                    got = fut.result()
                yield done, got
        finally:
            for _, fut in pending:
                fut.cancel()


def run_lanes(jobs: list[Callable[[], None]], lanes: int) -> None:
    """Run shard jobs ``lanes`` at a time; the first failure cancels the rest and is raised."""
    if lanes <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    failed = threading.Event()

    def guarded(job: Callable[[], None]) -> None:
        if not failed.is_set():
            try:
                job()
            except BaseException:
                failed.set()
                raise

    with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="recast-lane") as pool:
        futures = [pool.submit(guarded, job) for job in jobs]
        for fut in futures:
            fut.result()
