"""The engine's public surface: convert, verify, inspect. No Celery, Redis or HTTP in here."""

from __future__ import annotations

import os

from .adapters import ADAPTERS, detect
from .checkpoint import open_checkpoint
from .convert import convert
from .errors import VerificationError
from .formats import is_native
from .inspect import inspect
from .options import Options
from .report import Report
from .storage import LocalSource, Source, open_source
from .verify import verify_dirs


def verify(
    src: str | os.PathLike[str] | Source, dst: str | os.PathLike[str] | Source, device: str = "auto"
) -> Report:
    """Re-check an existing conversion of ``src`` at ``dst``; raises VerificationError if it fails."""
    ckpt = open_checkpoint(open_source(src))
    dst_source = open_source(dst)
    sidecar = open_checkpoint(dst_source).sidecar or {}
    opts = Options(to=sidecar.get("format", "hf"), device=device, **_recorded(sidecar))
    opts.validate()
    adapter = detect(ckpt.config, list(ckpt.tensors), sidecar.get("adapter"))
    report = Report.start(adapter, opts, is_native(ckpt))
    verify_dirs(ckpt, dst_source, report, opts.torch_device())
    if not report.passed:
        raise VerificationError(f"verification failed: {report.failure_summary()}", report)
    return report


def _recorded(sidecar: dict) -> dict:
    o = sidecar.get("options", {})
    return {k: o[k] for k in ("dtype", "quantize") if k in o}


__all__ = [
    "ADAPTERS",
    "LocalSource",
    "Options",
    "Report",
    "VerificationError",
    "convert",
    "inspect",
    "verify",
]
