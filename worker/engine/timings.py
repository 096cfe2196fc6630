"""Where a conversion's time went, stage by stage, summed over its threads.

The pipeline overlaps reading, arithmetic, verification and writing, so wall time alone cannot say
which stage held it up; the report carries these sums (``stages`` in ``--json``) so a slow run names
its bottleneck: a stage whose sum approaches the wall time per lane is the one to make faster.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timings:
    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._sums[stage] = self._sums.get(stage, 0.0) + seconds

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - started)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 3) for k, v in sorted(self._sums.items())}
