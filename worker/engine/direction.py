"""What a conversion direction hands the pipeline: the output layout, work units per shard, checks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import Checkpoint
from .checks import Checks
from .hostpool import HostPool
from .keymap import KeyPlan
from .layout import Layout
from .pipeline import Fetched, Read, Unit
from .report import Report


@dataclass
class Direction:
    """One planned conversion, from headers alone.

    ``units(shard, checks)`` yields the shard's work units in file order; with ``checks`` each unit
    also proves what it wrote. ``expected()`` names every source tensor the checks must cover (and
    how many rows of it), ``account`` files every source key under mapped, scales, injected or
    dropped. ``sidecar_scales`` are source tensors a native output keeps beside its weights.
    """

    plan: KeyPlan | None
    layout: Layout
    config: dict[str, Any]
    units: Callable[[str, Checks | None], Iterator[Unit]]
    fetch: Callable[[list[Read]], Fetched]
    expected: Callable[[], dict[str, int]]
    account: Callable[[Report], None]
    sidecar_scales: list[str] = field(default_factory=list)
    pool: HostPool | None = None


def account_rest(src: Checkpoint, report: Report) -> None:
    seen = {k for group in ("mapped", "scales", "dropped", "injected") for k in report.accounting[group]}
    report.accounting["unaccounted"] = sorted(set(src.tensors) - seen)
