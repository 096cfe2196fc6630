"""A conversion: planned from headers, its shards produced (in flight, verified), its metadata and
hashes written, then published in one rename.

``plan_conversion`` fixes the output's shards up front; each can then be produced on its own, in any
process and any order (the job workers spread them), and ``convert`` runs them all here, a few at
a time. With verification on, every unit proves the bytes it hands to the writer before they are
written, and the SHA-256 recorded for each shard is computed from those same buffers as they are
written: the chain from the checked values to the published hash has no gap (README, Verification).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .adapters import Adapter, detect
from .checkpoint import SIDECAR, SIDECAR_TENSORS, Checkpoint, open_checkpoint
from .checks import Checks, same_bits
from .direction import Direction
from .errors import RecastError, TargetExistsError, VerificationError
from .formats import is_native
from .layout import Layout
from .options import STEP_BYTES, Options, Progress
from .pipeline import lanes, produce_shard, run_lanes
from .publish import (
    file_sha256,
    finish_sidecar,
    publish_dir,
    write_fixed_metadata,
    write_metadata,
    write_record,
)
from .report import Report
from .safetensors_io import TensorInfo, parse_header
from .shard_stream import Sink
from .storage import LocalSource, Source, open_source
from .tensors import TensorSource, read_many
from .timings import Timings
from .to_hf import to_hf
from .to_native import to_native
from .verify import verify_dirs

# Bytes of later units read ahead per shard: a few units keep the disk reading while one computes.
READ_AHEAD_UNITS = 4


@dataclass
class Conversion:
    """A conversion planned from headers alone: the output's shards are fixed up front and each can be
    produced on its own, in any process, in any order; the metadata files follow once all exist."""

    ckpt: Checkpoint
    adapter: Adapter
    opts: Options
    dev: torch.device
    direction: Direction
    hashes: dict[str, str] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def layout(self) -> Layout:
        return self.direction.layout

    def shard_names(self) -> list[str]:
        return self.layout.names()

    def new_checks(self) -> Checks:
        return Checks(self.direction.expected(), self.timings)

    def write_shard(
        self,
        name: str,
        directory: Path,
        progress: Progress | None = None,
        checks: Checks | None = None,
        sink: Sink | None = None,
    ) -> Path:
        """Write output shard ``name`` under ``directory`` (complete or not at all), or with a ``sink``
        hand its bytes to the sink instead (no file is written; ``planned_size`` is its size); with
        ``checks``, verify every piece before it is written. Its SHA-256 lands in ``hashes``."""
        report = progress or (lambda _: None)
        sha = produce_shard(
            directory / name,
            self.layout.header(name),
            self.layout.slots(name),
            self.direction.units(name, checks),
            self.direction.fetch,
            READ_AHEAD_UNITS * STEP_BYTES[self.dev.type],
            lambda n: report({"shard": name, "bytes_in": n}),
            self.timings,
            self.direction.pool.give if self.direction.pool else None,
            sink,
        )
        with self._lock:
            self.hashes[name] = sha
        report({"shard": name, "done": True})
        return directory / name

    def write_shards(
        self, directory: Path, progress: Progress | None = None, checks: Checks | None = None
    ) -> None:
        """Every shard, a few at a time (see ``pipeline.LANES``)."""
        lock = threading.Lock()

        def locked(p: dict) -> None:
            if progress is not None:
                with lock:
                    progress(p)

        jobs = [lambda n=n: self.write_shard(n, directory, locked, checks) for n in self.shard_names()]
        run_lanes(jobs, lanes(self.dev.type))

    def write_metadata(self, directory: Path) -> list[str]:
        """Scales sidecar, config, carried files, index and recast.json; returns the names written."""
        return write_metadata(
            self.ckpt, directory, self.direction, self.adapter, self.opts, self.source_scales
        )

    def write_fixed_metadata(self, directory: Path) -> list[str]:
        """The metadata files the plan fixes (all but recast.json); returns the names written."""
        return write_fixed_metadata(self.ckpt, directory, self.direction, self.opts, self.source_scales)

    def write_record(self, directory: Path) -> str:
        """recast.json before ``finish_sidecar``: read from the plan, no file is read."""
        return write_record(self.ckpt, directory, self.direction, self.adapter, self.opts)

    def new_report(self) -> Report:
        plan = self.direction.plan
        return Report.start(self.adapter, self.opts, is_native(self.ckpt), plan.passthrough if plan else None)

    @cached_property
    def source_scales(self) -> dict[str, torch.Tensor]:
        """The source's scales a native output keeps beside its weights, read once (concurrently)."""
        return read_many(TensorSource.of(self.ckpt), self.direction.sidecar_scales)

    def planned_size(self, name: str) -> int:
        """Bytes of output shard ``name``: its 8-byte length, header and data, all fixed by the plan."""
        slots = self.layout.slots(name)
        return 8 + len(self.layout.header(name)) + max((s.end for s in slots.values()), default=0)

    def check_kept_scales(self, checks: Checks, metadata: Path) -> None:
        """The scales kept beside a native output, as written in the local ``metadata`` directory, are
        the source's, bit for bit."""
        if self.direction.sidecar_scales:
            written = LocalSource(metadata)
            kept = TensorSource(written, {}, _sidecar_infos(written))
            for key in self.direction.sidecar_scales:
                ok = key in kept.extra and same_bits(kept.rows(key), self.source_scales[key])
                checks.bitwise(key, 1, ok, "recorded scale differs from the source")

    def settle(self, checks: Checks, report: Report, sizes: dict[str, int]) -> Report:
        """Close in-flight verification: every shard was written at its planned size (its bytes were
        checked and hashed as they were written), and every source tensor was checked in full (the kept
        scales by ``check_kept_scales``)."""
        for name in self.shard_names():
            want, got = self.planned_size(name), sizes.get(name)
            if got != want:
                report.problems.append(f"{name}: {got} bytes written, the plan says {want}")
        checks.fill(report)
        self.direction.account(report)
        return report

    def verify(self, written: Source, report: Report) -> Report:
        """Re-read a written conversion from storage and check it against the source."""
        return verify_dirs(self.ckpt, written, report, self.dev)


def _sidecar_infos(written: Source) -> dict[str, TensorInfo]:
    return parse_header(written, SIDECAR_TENSORS).tensors if written.exists(SIDECAR_TENSORS) else {}


def plan_conversion(src: str | os.PathLike[str] | Source, opts: Options) -> Conversion:
    """Open ``src`` from its headers and fix the output layout; raises RecastError on bad input."""
    opts.validate()
    ckpt = open_checkpoint(open_source(src))
    adapter = _adapter_for(ckpt, opts.adapter)
    dev = opts.torch_device()
    if opts.to == "native":
        if is_native(ckpt):
            raise RecastError(f"{ckpt.source.description} is already a native checkpoint; use --to hf")
        direction = to_native(ckpt, adapter, opts, dev)
    else:
        direction = to_hf(ckpt, adapter, opts, dev)
    return Conversion(ckpt, adapter, opts, dev, direction)


def convert(
    src: str | os.PathLike[str] | Source,
    dst: str | os.PathLike[str],
    opts: Options,
    progress: Progress | None = None,
) -> Report:
    """Convert ``src`` into a new checkpoint at ``dst``; raises with the report if verification fails."""
    started = time.monotonic()
    conv = plan_conversion(src, opts)
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not opts.overwrite:
        raise TargetExistsError(f"{dst} already holds files; pass --overwrite to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = dst.with_name(f".{dst.name}.recast-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        checks = conv.new_checks() if opts.verify else None
        if progress is not None:
            progress({"bytes_total": conv.ckpt.total_bytes, "shards": conv.shard_names()})
        conv.write_shards(stage, progress, checks)
        with conv.timings.timed("metadata"):
            names = conv.write_metadata(stage)
        report = conv.new_report()
        if checks is not None:
            sizes = {n: (stage / n).stat().st_size for n in conv.shard_names()}
            with conv.timings.timed("settle"):
                conv.check_kept_scales(checks, stage)
                conv.settle(checks, report, sizes)
        report.seconds = time.monotonic() - started
        report.bytes_in = conv.ckpt.total_bytes
        report.bytes_out = conv.layout.total_bytes()
        files = conv.hashes | {n: file_sha256(stage / n) for n in names if n != SIDECAR}
        report.stages = conv.timings.as_dict()
        finish_sidecar(stage, report, files)
        if opts.verify and not report.passed:
            raise VerificationError(f"verification failed: {report.failure_summary()}", report)
        publish_dir(stage, dst)
        return report
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _adapter_for(ckpt: Checkpoint, name: str | None) -> Adapter:
    if name is None and ckpt.sidecar and ckpt.sidecar.get("adapter"):
        name = ckpt.sidecar["adapter"]
    return detect(ckpt.config, list(ckpt.tensors), name)
