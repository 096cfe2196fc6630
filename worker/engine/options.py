"""What a conversion is asked to do, validated once; the choices are spelled here and nowhere else."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .encode import QUANTIZE_MODES
from .errors import RecastError
from .qformat import FORMAT_NAMES

DTYPE_ARGS = {"bf16": "BF16", "fp32": "F32", "fp16": "F16"}
DEVICES = ("auto", "cpu", "cuda")
# Bytes of source read per work unit: large enough to keep the GPU and the disk busy, small enough to
# bound host memory (a few units per shard lane are in flight at once). On the CPU, small: glibc serves
# allocations above 32 MiB with fresh mmaps, and faulting in fresh pages for every unit's output took
# more system time than the arithmetic (2 cores, 12-shard bench: 25.0 s at 16 MiB, 13.9 s at 4 MiB).
STEP_BYTES = {"cpu": 4 << 20, "cuda": 64 << 20}

# What a conversion reports as it goes, each call one of: ``{"bytes_total": n, "shards": [names]}`` once,
# when ``convert`` has planned; ``{"shard": name, "bytes_in": n}`` per work unit done (source bytes);
# ``{"shard": name, "done": True}`` when an output shard is complete. Consumers ignore what they do not use.
Progress = Callable[[dict[str, Any]], None]


@dataclass
class Options:
    to: str
    adapter: str | None = None
    dtype: str = "bf16"
    quantize: str = "keep"
    format: str | None = None  # how quantized hf output is spelled; None: the source's (fp8 if unknown)
    device: str = "auto"
    verify: bool = True
    overwrite: bool = False
    source_location: str | None = None
    source_revision: str | None = None

    def validate(self) -> None:
        if self.to not in ("native", "hf"):
            raise RecastError(f"--to must be native or hf, not {self.to!r}")
        if self.dtype not in DTYPE_ARGS:
            raise RecastError(f"--dtype must be one of {', '.join(DTYPE_ARGS)}, not {self.dtype!r}")
        if self.quantize not in QUANTIZE_MODES:
            raise RecastError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, not {self.quantize!r}")
        if self.format is not None and self.format not in FORMAT_NAMES:
            raise RecastError(f"--format must be one of {', '.join(FORMAT_NAMES)}, not {self.format!r}")
        if self.device not in DEVICES:
            raise RecastError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RecastError("--device cuda was asked for but no CUDA device is visible")

    def torch_device(self) -> torch.device:
        if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")
