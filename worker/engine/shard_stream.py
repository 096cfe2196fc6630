"""Writing one shard front to back while a second thread hashes the same bytes.

The output's layout is fixed before any tensor is computed, so every piece has a known offset.
Pieces are written strictly in file order: one that arrives early (a block scale computed with its
weight's rows, say) waits in memory until the bytes before it are out, and units are scheduled in
offset order so that only small pieces ever wait. Writing in order is what lets the SHA-256 be
computed from the very buffers handed to the kernel, while they are written, instead of re-reading
the file afterwards; hashing runs beside the writing thread, not in it, because SHA-256 at ~1.3 GB/s
per core in the writer would halve the write rate. ``close`` fsyncs and renames the file into place:
a shard is complete or absent.

A ``Sink`` takes the writer's place where the shard's bytes go to a store rather than a file (an S3
multipart upload, say): it receives the same ordered bytes, so the upload runs while the shard is produced,
and no local copy is written and read back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .errors import CheckpointError
from .safetensors_io import DTYPES, PlannedTensor, build_header
from .timings import Timings

# Bytes handed to the writer and hasher but not yet written, per shard: enough to ride out a slow
# fsync of a neighbour, small next to the memory bound of three output shards.
WRITE_BEHIND = 512 << 20
# The writer flushes to the disk every this many bytes, so the kernel writes back while the shard is
# still being produced instead of all at the final fsync, which would stall its lane (on the H200 the
# lanes spent 24 of 29 s in fsync at the ends of shards) and pile up dirty pages.
SYNC_EVERY = 256 << 20


class Sink(Protocol):
    """Takes a shard's bytes in file order, instead of the file."""

    def write(self, data: memoryview) -> None:
        """The next bytes; ``data`` is only valid during the call (copy what is kept)."""
        ...


@dataclass(frozen=True)
class Slot:
    """Where a tensor's bytes go in the data area of its shard."""

    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape[1:]:
            n *= d
        return n


def slots_of(tensors: list[PlannedTensor]) -> dict[str, Slot]:
    out, offset = {}, 0
    for t in tensors:
        out[t.key] = Slot(offset, offset + t.nbytes, t.dtype, t.shape)
        offset += t.nbytes
    return out


def planned_header(tensors: list[PlannedTensor]) -> bytes:
    return build_header(tensors, {"format": "pt"})


def host_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


class _Budget:
    """Blocks the producer while more than ``limit`` bytes are queued and not yet written and hashed."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    def take(self, n: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class ShardStream:
    """One output shard: ``put`` pieces (any order, each once), then ``close`` for its SHA-256.

    The bytes go to the file ``path``, or with a ``sink`` to the sink alone (``path`` then only names the
    shard in errors).
    """

    def __init__(
        self,
        path: Path,
        header: bytes,
        slots: dict[str, Slot],
        timings: Timings | None = None,
        release: Callable[[torch.Tensor], None] | None = None,
        sink: Sink | None = None,
    ):
        self.path = path
        self._sink = sink
        # Unique per writer: two workers given the same shard (a redelivered task) never share a file.
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
        self._slots = slots
        self._end = max((s.end for s in slots.values()), default=0)
        self._cursor = 0
        self._early: dict[int, tuple[memoryview, torch.Tensor]] = {}
        self._filled: dict[str, int] = {}
        self._budget = _Budget(WRITE_BEHIND)
        self._sha = hashlib.sha256()
        self._timings = timings or Timings()
        self._release = release
        self._unsynced = 0
        self._error: BaseException | None = None
        self._aborted = False  # the bytes still queued are dropped, not written or uploaded
        self._fd = -1
        if sink is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue(), queue.SimpleQueue()]
        self._left: dict[int, list] = {}
        self._lock = threading.Lock()
        out, stage = (self._write, "write") if sink is None else (sink.write, "upload")
        self._threads = [
            threading.Thread(target=self._drain, args=(q, fn, name), daemon=True)
            for q, fn, name in zip(self._queues, (out, self._sha.update), (stage, "hash"), strict=True)
        ]
        for t in self._threads:
            t.start()
        self._emit(memoryview(len(header).to_bytes(8, "little") + header), None)

    def put(self, key: str, row: int, t: torch.Tensor) -> None:
        """Rows ``row…`` of tensor ``key``; checked against the plan before a byte is queued."""
        slot = self._slots.get(key)
        rows = t.shape[0] if t.dim() else 1
        if (
            slot is None
            or DTYPES[slot.dtype] != t.dtype
            or tuple(t.shape[1:]) != slot.shape[1:]
            or row + rows > (slot.shape[0] if slot.shape else 1)
        ):
            want = f"{slot.dtype} {list(slot.shape)}" if slot else "no such tensor"
            raise CheckpointError(
                f"{self.path.name}: piece of {key!r} is {t.dtype} {list(t.shape)} at row {row}; the plan says {want}"
            )
        data = host_bytes(t)
        self._filled[key] = self._filled.get(key, 0) + len(data)
        if not len(data):
            return
        offset = slot.start + row * slot.row_bytes
        if offset < self._cursor or offset in self._early:
            raise CheckpointError(f"{self.path.name}: bytes of {key!r} at row {row} were already written")
        self._early[offset] = (data, t)
        while self._cursor in self._early:
            piece, owner = self._early.pop(self._cursor)
            self._cursor += len(piece)
            self._emit(piece, owner)

    def close(self) -> str:
        """Wait for the bytes, fsync, rename into place (or, with a sink, wait until it has every
        byte); returns the shard's SHA-256 (hex)."""
        short = sorted(k for k, s in self._slots.items() if self._filled.get(k, 0) != s.end - s.start)
        if short or self._early or self._cursor != self._end:
            self.abort()
            raise CheckpointError(f"{self.path.name}: never received all of {short[:5]}")
        self._finish()
        if self._error is not None:
            self._cleanup()
            raise self._error
        if self._sink is not None:
            return self._sha.hexdigest()
        os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self.tmp, self.path)
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Give up the shard: what is still queued is released unwritten (a sink would otherwise upload
        up to ``WRITE_BEHIND`` bytes of a shard that is about to be thrown away)."""
        self._aborted = True
        self._finish()
        self._cleanup()

    def _emit(self, data: memoryview, owner: torch.Tensor | None) -> None:
        """Queue bytes for the writer and the hasher; ``owner`` is released once both are done."""
        if self._error is not None:
            raise self._error
        self._budget.take(len(data))
        with self._lock:
            self._left[id(data)] = [2, owner]
        for q in self._queues:
            q.put(data)

    def _drain(self, q: queue.SimpleQueue, consume, stage: str) -> None:
        while (data := q.get()) is not None:
            try:
                if self._error is None and not self._aborted:
                    with self._timings.timed(stage):
                        consume(data)
            except BaseException as exc:  # surfaced to the producer on its next put or close
                self._error = exc
            with self._lock:
                entry = self._left[id(data)]
                entry[0] -= 1
                done = entry[0] == 0
                if done:
                    del self._left[id(data)]
            if done:
                if entry[1] is not None and self._release is not None:
                    self._release(entry[1])
                self._budget.give(len(data))

    def _write(self, data: memoryview) -> None:
        self._unsynced += len(data)
        while len(data):
            n = os.write(self._fd, data)
            data = data[n:]
        if self._unsynced >= SYNC_EVERY:
            os.fdatasync(self._fd)
            self._unsynced = 0

    def _finish(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()

    def _cleanup(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self.tmp.unlink(missing_ok=True)
