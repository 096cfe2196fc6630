"""What ``recast convert`` and ``recast verify`` show while they run.

At a terminal: rich's progress bars, one for the checkpoint (bytes, throughput, time left) and one per
shard in flight, gone once the shard is written, as ``hf download`` and ``pip`` show them. Anywhere else
(a pipe, a CI log) or under ``--json``: no bar, only one log line per finished shard on the
``recast.progress`` logger, so logs stay readable and stdout stays machine-readable.

The engine reports through a plain callback (``worker.engine.options.Progress``); ``Display`` is one,
and ``ReadCounter`` turns a ``Source``'s reads into the same events for verification, which re-reads a
written checkpoint and has no callback of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from worker.cli_print import human
from worker.engine.storage import Source

log = logging.getLogger("recast.progress")


class Display:
    """Progress of one conversion or verification, fed engine events from any thread.

    ``interactive`` draws bars on stderr; otherwise one line per finished shard goes to the log.
    ``verb`` names what is done to a shard ("converted", "verified").
    """

    def __init__(self, label: str, verb: str, interactive: bool):
        self.label = label
        self.verb = verb
        self.total: int | None = None
        self.shards_total = 0
        self.done_bytes = 0
        self.shard_bytes: dict[str, int] = {}
        self.finished: set[str] = set()
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._bars: Progress | None = None
        self._overall: TaskID | None = None
        self._tasks: dict[str, TaskID] = {}
        if interactive:
            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )

    def __enter__(self) -> Display:
        if self._bars is not None:
            self._bars.start()
            self._overall = self._bars.add_task(self.label, total=None)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bars is not None:
            for task in self._tasks.values():
                self._bars.remove_task(task)
            self._bars.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            if "bytes_total" in event:
                self.plan(event["bytes_total"], len(event.get("shards", ())))
            elif event.get("done"):
                self._finish(event["shard"])
            elif "bytes_in" in event:
                self._advance(event.get("shard", ""), event["bytes_in"])

    def plan(self, total: int, shards: int) -> None:
        """The bytes and shards the whole run will go through, once known."""
        self.total, self.shards_total = total, shards
        if self._bars is not None and self._overall is not None:
            self._bars.update(self._overall, total=total, description=self._description())

    def _description(self) -> str:
        if not self.shards_total:
            return self.label
        return f"{self.label} ({len(self.finished)}/{self.shards_total} shards)"

    def _advance(self, shard: str, n: int) -> None:
        self.done_bytes += n
        self.shard_bytes[shard] = self.shard_bytes.get(shard, 0) + n
        if self._bars is None or self._overall is None:
            return
        self._bars.advance(self._overall, n)
        if shard and shard not in self.finished:
            if shard not in self._tasks:
                self._tasks[shard] = self._bars.add_task(f"  {shard}", total=None)
            self._bars.advance(self._tasks[shard], n)

    def _finish(self, shard: str) -> None:
        if shard in self.finished:
            return
        self.finished.add(shard)
        if self._bars is not None:
            task = self._tasks.pop(shard, None)
            if task is not None:
                self._bars.remove_task(task)
            if self._overall is not None:
                self._bars.update(self._overall, description=self._description())
            return
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done_bytes / elapsed
        line = f"{self.verb} {shard} ({human(self.shard_bytes.get(shard, 0))})"
        if self.shards_total:
            line += f": {len(self.finished)}/{self.shards_total} shards"
        if self.total:
            # Reads of scales kept beside the tensors, or re-read for checks, can pass the planned total.
            done = min(self.done_bytes, self.total)
            left = (self.total - done) / rate if rate else 0.0
            line += (
                f", {human(done)} of {human(self.total)} "
                f"({100 * done / self.total:.0f}%), {rate / 1e6:.1f} MB/s, "
                f"about {left:.0f} s left"
            )
        log.info(line)

    def finish_all(self) -> None:
        """Mark every shard that was read from as finished (verification knows no shard ends)."""
        with self._lock:
            for shard in [s for s in self.shard_bytes if s and s not in self.finished]:
                self._finish(shard)


class ReadCounter:
    """A ``Source`` that reports the bytes read from each safetensors file to a ``Display``: how far a
    verification has got through the checkpoint it re-reads. A shard counts as done once as many bytes
    were read from it as it holds."""

    def __init__(self, source: Source, display: Display):
        self.source = source
        self.display = display
        self.description = source.description
        self.sizes = {n: source.size(n) for n in source.list() if n.endswith(".safetensors")}
        self._read: dict[str, int] = {}
        self._lock = threading.Lock()
        display.plan(sum(self.sizes.values()), len(self.sizes))

    def list(self) -> list[str]:
        return self.source.list()

    def size(self, name: str) -> int:
        return self.source.size(name)

    def exists(self, name: str) -> bool:
        return self.source.exists(name)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        data = self.source.read_range(name, start, end)
        size = self.sizes.get(name)
        if size is not None:
            self.display({"shard": name, "bytes_in": len(data)})
            with self._lock:
                before = self._read.get(name, 0)
                self._read[name] = after = before + len(data)
            if before < size <= after:
                self.display({"shard": name, "done": True})
        return data
