"""The verification report: per-tensor results, key accounting, bytes and seconds.

Accounting groups: ``mapped``, ``scales``, ``injected``, ``dropped`` partition the source keys (what is
left is ``unaccounted``); ``passthrough`` lists, from the key plan, the keys no adapter rule touched, so
a reader can see what the adapter left exactly as it found it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .fp8 import ErrorStats


@dataclass
class TensorResult:
    key: str
    check: str  # "bitwise" or "bounded"
    passed: bool
    stats: ErrorStats | None = None
    detail: str = ""


@dataclass
class Report:
    adapter: str
    direction: str
    options: dict[str, Any]
    tensors: list[TensorResult] = field(default_factory=list)
    accounting: dict[str, list[str]] = field(
        default_factory=lambda: {
            "mapped": [],
            "scales": [],
            "injected": [],
            "dropped": [],
            "unaccounted": [],
            "passthrough": [],
        }
    )
    problems: list[str] = field(default_factory=list)
    verified: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, adapter, opts, source_native: bool, passthrough: list[str] | None = None) -> Report:
        src = "native" if source_native else "hf"
        report = cls(
            adapter.name, f"{src}->{opts.to}", {k: v for k, v in asdict(opts).items() if k != "overwrite"}
        )
        report.accounting["passthrough"] = list(passthrough or [])
        return report

    def add(self, result: TensorResult) -> None:
        self.tensors.append(result)

    @property
    def passed(self) -> bool:
        return (
            self.verified
            and not self.problems
            and all(t.passed for t in self.tensors)
            and not self.accounting["unaccounted"]
        )

    def failure_summary(self) -> str:
        bad = [t for t in self.tensors if not t.passed]
        parts = [*self.problems[:3]]
        parts += [f"{t.key}: {t.detail or t.check + ' check failed'}" for t in bad[:3]]
        if self.accounting["unaccounted"]:
            parts.append(f"unaccounted source keys {self.accounting['unaccounted'][:3]}")
        more = len(bad) + len(self.problems) - 3
        return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")

    def summary(self) -> dict[str, Any]:
        bounded = [t for t in self.tensors if t.check == "bounded"]
        worst = max(bounded, key=lambda t: t.stats.worst_bound_ratio, default=None)
        return {
            "verified": self.verified,
            "passed": self.passed,
            "tensors_checked": len(self.tensors),
            "bitwise_equal": sum(1 for t in self.tensors if t.check == "bitwise" and t.passed),
            "bounded": len(bounded),
            "bounded_within": sum(1 for t in bounded if t.passed),
            "worst_bound_ratio": worst.stats.worst_bound_ratio if worst else None,
            "min_snr_db": min((t.stats.snr_db for t in bounded), default=None),
            "failed": [t.key for t in self.tensors if not t.passed][:20],
            "problems": self.problems[:20],
            "accounting": {k: len(v) for k, v in self.accounting.items()},
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "direction": self.direction,
            "options": self.options,
            "summary": self.summary(),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
            "stages": self.stages,
            "throughput_gb_s": {
                "in": round(self.bytes_in / self.seconds / 1e9, 3) if self.seconds else None,
                "out": round(self.bytes_out / self.seconds / 1e9, 3) if self.seconds else None,
            },
            "accounting": self.accounting,
            "tensors": [
                {"key": t.key, "check": t.check, "passed": t.passed, "detail": t.detail}
                | ({"stats": asdict(t.stats)} if t.stats else {})
                for t in self.tensors
            ],
            "files": self.files,
        }
