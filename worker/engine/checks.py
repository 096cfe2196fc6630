"""Verification results, gathered tensor by tensor from any number of threads.

Both ways of proving a conversion use these: in flight (each written piece inverted while its source
bytes are still in memory) and by re-reading a finished checkpoint (``verify.py``). A lossless step
must give back the source's bits; a lossy one (fresh quantization, a narrowing cast) is held to the
e4m3 bound and reported with its figures. Coverage is counted too: a source tensor whose rows were
not all checked fails, so nothing is skipped silently.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .fp8 import ErrorStats, bounded_error
from .report import Report, TensorResult
from .timings import Timings


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaNs and signed zeros included), through any strides."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.device != b.device:
        b = b.to(a.device)
    if not (a.is_contiguous() and b.is_contiguous()):
        as_int = _INT[a.element_size()]
        return torch.equal(a.view(as_int), b.view(as_int))
    a, b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    # Compare as wide integers where the length allows: same bits, an eighth of the elements.
    wide = next(
        w for w in (torch.int64, torch.int32, torch.int16, torch.uint8) if a.numel() % w.itemsize == 0
    )
    return torch.equal(a.view(wide), b.view(wide))


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def measure(
    original: torch.Tensor, restored: torch.Tensor, scale: torch.Tensor | None
) -> tuple[ErrorStats, float, float]:
    """A lossy piece's figures: the e4m3 bound check, and its signal and noise energy for the SNR."""
    w = original.float()
    return (
        bounded_error(original, restored, scale),
        float(w.pow(2).sum()),
        float((w - restored.float()).pow(2).sum()),
    )


@dataclass
class Acc:
    """One tensor's result, accumulated over the pieces it was checked in."""

    check: str = "bitwise"
    passed: bool = True
    max_abs: float = 0.0
    ratio: float = 0.0
    signal: float = 0.0
    noise: float = 0.0
    detail: str = ""
    rows: int = 0

    def fail(self, detail: str) -> None:
        self.passed, self.detail = False, self.detail or detail

    def bounded(self, original: torch.Tensor, restored: torch.Tensor, scale: torch.Tensor | None) -> None:
        self.merge(*measure(original, restored, scale))

    def merge(self, stats: ErrorStats, signal: float, noise: float) -> None:
        self.check = "bounded"
        self.max_abs = max(self.max_abs, stats.max_abs_error)
        self.ratio = max(self.ratio, stats.worst_bound_ratio)
        self.signal += signal
        self.noise += noise
        if not stats.within_bound:
            self.fail(
                f"error {stats.max_abs_error:.3g} exceeds the e4m3 bound ({stats.worst_bound_ratio:.2f}x)"
            )

    def result(self, key: str) -> TensorResult:
        stats = None
        if self.check == "bounded":
            snr = (
                math.inf
                if self.noise == 0
                else 10 * math.log10(self.signal / self.noise)
                if self.signal
                else 0.0
            )
            stats = ErrorStats(self.max_abs, snr, self.ratio <= 1.0, self.ratio)
        return TensorResult(key, self.check, self.passed, stats, self.detail)


class Checks:
    """Per-source-tensor accumulators; ``rows`` says how many dim-0 rows each must have checked."""

    def __init__(self, rows: dict[str, int], timings: Timings | None = None):
        self.expected = rows
        self.timings = timings or Timings()
        self._accs: dict[str, Acc] = {}
        self._lock = threading.Lock()

    def acc(self, key: str) -> Acc:
        with self._lock:
            return self._accs.setdefault(key, Acc())

    def bitwise(self, key: str, rows: int, ok: bool, detail: str = "re-created source bytes differ") -> None:
        acc = self.acc(key)
        with self._lock:
            acc.rows += rows
            if not ok:
                acc.fail(detail)

    def bounded(
        self, key: str, rows: int, original: torch.Tensor, restored: torch.Tensor, scale: torch.Tensor | None
    ) -> None:
        figures = measure(original, restored, scale)
        acc = self.acc(key)
        with self._lock:
            acc.rows += rows
            acc.merge(*figures)

    def export(self) -> dict[str, dict[str, Any]]:
        """The results so far as JSON-able data: a shard's worker records them, finalize ``load``s them."""
        with self._lock:
            return {k: asdict(acc) for k, acc in self._accs.items()}

    def load(self, exported: dict[str, dict[str, Any]]) -> None:
        """Merge results exported elsewhere (another worker's shard)."""
        for key, fields in exported.items():
            theirs = Acc(**fields)
            acc = self.acc(key)
            with self._lock:
                acc.rows += theirs.rows
                if theirs.check == "bounded":
                    acc.check = "bounded"
                    acc.max_abs = max(acc.max_abs, theirs.max_abs)
                    acc.ratio = max(acc.ratio, theirs.ratio)
                    acc.signal += theirs.signal
                    acc.noise += theirs.noise
                if not theirs.passed:
                    acc.fail(theirs.detail)

    @property
    def failed(self) -> list[str]:
        with self._lock:
            return [k for k, acc in self._accs.items() if not acc.passed]

    def fill(self, report: Report) -> None:
        """Add every tensor's result; a tensor not checked in full fails, naming what is missing."""
        for key, want in self.expected.items():
            acc = self._accs.get(key) or Acc(passed=False, detail="never verified")
            if acc.passed and acc.rows != want:
                acc.fail(f"verified {acc.rows} of {want} rows")
            report.add(acc.result(key))
        report.verified = True
