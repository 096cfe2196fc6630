"""A read-rate limit on a source, so a conversion does not starve other readers of a shared store."""

from __future__ import annotations

import threading
import time

from worker.engine.storage import Source


class ThrottledSource:
    """Wraps a ``Source``; ranged reads are paced to ``bytes_per_s`` across all threads of the process."""

    def __init__(self, inner: Source, bytes_per_s: int):
        self.inner = inner
        self.description = inner.description
        self.rate = bytes_per_s
        self._lock = threading.Lock()
        self._free_at = time.monotonic()

    def list(self) -> list[str]:
        return self.inner.list()

    def size(self, name: str) -> int:
        return self.inner.size(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        with self._lock:
            now = time.monotonic()
            begin = max(now, self._free_at)
            self._free_at = begin + (end - start) / self.rate
        if begin > now:
            time.sleep(begin - now)
        return self.inner.read_range(name, start, end)
