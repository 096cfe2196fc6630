"""The conversion pipeline: plan from headers, stream work units into staged shards, verify, publish.

Directions: hf → native (dequantize, rename, transpose/stack, inject), native → hf (the inverse, with
recorded or fresh scales) and hf → hf (dequantize or re-quantize). Output is staged in a sibling
directory and renamed into place only after verification, so a target is complete or absent.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapters import Adapter, detect
from .checkpoint import INDEX, SIDECAR, SIDECAR_TENSORS, Checkpoint, open_checkpoint
from .encode import QUANTIZE_MODES, Encoder, Encoding, choose, quantization_config
from .errors import RecastError, TargetExistsError, VerificationError
from .keymap import KeyPlan, NativeTensor, find_quant, plan_from_hf, plan_from_native
from .report import Report
from .safetensors_io import DTYPES, PlannedTensor, ShardHeader, ShardWriter, parse_header
from .storage import LocalSource, Source
from .tensors import (
    TensorSource,
    forward,
    forward_requests,
    hf_align,
    hf_shapes,
    hf_value,
    inverse,
    native_shape,
    prefetch,
    row_chunks,
)

DTYPE_ARGS = {"bf16": "BF16", "fp32": "F32", "fp16": "F16"}
# Bytes of source read per step: large enough to keep the GPU busy, small enough to bound host memory.
STEP_BYTES = {"cpu": 16 << 20, "cuda": 128 << 20}


@dataclass
class Options:
    to: str
    adapter: str | None = None
    dtype: str = "bf16"
    quantize: str = "keep"
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
        if self.device not in ("auto", "cpu", "cuda"):
            raise RecastError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RecastError("--device cuda was asked for but no CUDA device is visible")

    def torch_device(self) -> torch.device:
        if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")


Progress = Callable[[dict[str, Any]], None]


def is_native(ckpt: Checkpoint) -> bool:
    """Native checkpoints carry Recast's sidecar, or at least native-only expert keys."""
    if ckpt.sidecar is not None:
        return ckpt.sidecar.get("format") == "native"
    return any(k.endswith(("gate_and_up_projs", "down_projs")) for k in ckpt.tensors)


def sidecar_tensors(ckpt: Checkpoint) -> dict[str, Any]:
    if ckpt.source.exists(SIDECAR_TENSORS):
        return parse_header(ckpt.source, SIDECAR_TENSORS).tensors
    return {}


# ---------------------------------------------------------------------------------------------- output


@dataclass
class Output:
    """Shards being written: layout planned up front, writers opened lazily, staged under ``root``."""

    root: Path
    shards: list[list[PlannedTensor]] = field(default_factory=list)
    raw_headers: dict[str, bytes] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    _writers: dict[str, ShardWriter] = field(default_factory=dict)

    def names(self) -> list[str]:
        if self.raw_headers:
            return list(self.raw_headers)
        n = len(self.shards)
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def layout(self) -> None:
        if self.raw_headers:
            for name, raw in self.raw_headers.items():
                for k in json.loads(raw):
                    if k != "__metadata__":
                        self.where[k] = name
            return
        for name, tensors in zip(self.names(), self.shards, strict=True):
            for t in tensors:
                self.where[t.key] = name

    def writer(self, key: str) -> ShardWriter:
        name = self.where[key]
        if name not in self._writers:
            path = self.root / name
            if self.raw_headers:
                self._writers[name] = ShardWriter.from_raw_header(path, self.raw_headers[name])
            else:
                tensors = self.shards[self.names().index(name)]
                self._writers[name] = ShardWriter.planned(path, tensors, {"format": "pt"})
        return self._writers[name]

    def write(self, key: str, row: int, t: torch.Tensor, last: bool) -> None:
        self.writer(key).write(key, t.cpu(), row, last)

    def close(self) -> dict[str, str]:
        for name in self.names():
            self.writer(next(k for k, v in self.where.items() if v == name))
        for w in self._writers.values():
            w.close()
        return dict(self.where)

    def abort(self) -> None:
        for w in self._writers.values():
            w.abort()


# ------------------------------------------------------------------------------------------- execution


Step = tuple[Callable[[], Any], Callable[[Any], None]]


def run_steps(steps: Iterator[Step]) -> None:
    """Run (fetch, compute) pairs, fetching the next step's bytes while the current one computes."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for fetch, compute in steps:
            nxt = pool.submit(fetch)
            if pending is not None:
                pending[1](pending[0].result())
            pending = (nxt, compute)
        if pending is not None:
            pending[1](pending[0].result())


# ------------------------------------------------------------------------------------------- hf → native


def _to_native(
    src: Checkpoint, adapter: Adapter, opts: Options, out: Output, dev: torch.device, progress: Progress
) -> tuple[KeyPlan, dict[str, Any]]:
    plan = plan_from_hf(src, adapter)
    dtype_name = DTYPE_ARGS[opts.dtype]
    dtype = DTYPES[dtype_name]
    ts = TensorSource.of(src)
    shard_of = {}
    for t in plan.tensors:
        anchor = t.parts[0] if t.parts else _gate_of(t, plan)
        shard_of[t.key] = src.shards.index(src.tensors[anchor].file)
    order = sorted(plan.tensors, key=lambda t: (shard_of[t.key], _offset(src, t, plan)))
    used = sorted(set(shard_of.values()))
    out.shards = [[] for _ in used]
    shapes = {}
    for t in order:
        shape = native_shape(t, src.tensors)
        shapes[t.key] = shape
        dt = (
            "F32"
            if t.kind == "zeros"
            else (dtype_name if t.parts[0] in plan.quant else src.tensors[t.parts[0]].dtype)
        )
        out.shards[used.index(shard_of[t.key])].append(PlannedTensor(t.key, dt, shape))
    out.layout()
    budget = STEP_BYTES[dev.type]

    def steps() -> Iterator[Step]:
        for t in order:
            shape = shapes[t.key]
            if t.kind == "zeros":
                yield (lambda: None), (lambda _, t=t: out.write(t.key, 0, torch.zeros(t.experts), True))
                continue
            first = src.tensors[t.parts[0]]
            q = plan.quant.get(t.parts[0])
            if t.kind == "stack":  # a row is one expert: all of its 2-D part tensors
                per_row = sum(src.tensors[p].nbytes for p in t.part_of(0))
            else:
                per_row = first.nbytes // max(first.shape[0], 1) if first.shape else first.nbytes
            align = hf_align(q.kind if q else None, first.shape) if t.kind == "copy" else 1
            n = shape[0] if shape else 1
            for e0, e1 in row_chunks((n,), max(per_row, 1), budget, align):

                def fetch(t=t, e0=e0, e1=e1):
                    return prefetch(ts, plan.quant, forward_requests(t, e0, e1), dev.type == "cuda")

                def compute(got, t=t, n=n, e0=e0, e1=e1, shape=shape):
                    x = forward(t, e0, e1, lambda k, a, b: hf_value(ts, plan.quant, k, a, b, dtype, dev, got))
                    out.write(t.key, e0, x if shape else x.reshape(()), e1 >= n)
                    progress(
                        {"bytes_in": sum(src.tensors[p].nbytes for p in t.parts) * (e1 - e0) // max(n, 1)}
                    )

                yield fetch, compute

    run_steps(steps())
    config = copy.deepcopy(src.config)
    config.pop("quantization_config", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"].pop("quantization_config", None)
    return plan, config


def _gate_of(t: NativeTensor, plan: KeyPlan) -> str:
    gate = t.key[: -len("e_score_correction_bias")] + "weight"
    return next(p.parts[0] for p in plan.tensors if p.key == gate)


def _offset(src: Checkpoint, t: NativeTensor, plan: KeyPlan) -> int:
    return src.tensors[t.parts[0] if t.parts else _gate_of(t, plan)].start


# ---------------------------------------------------------------------------------------------- → hf


@dataclass
class HfItem:
    """One hf tensor to produce: where its value comes from and how it is encoded."""

    enc: Encoding
    shape: tuple[int, ...]
    native: NativeTensor | None
    value_dtype: str


def _to_hf(
    src: Checkpoint, adapter: Adapter, opts: Options, out: Output, dev: torch.device, progress: Progress
) -> tuple[KeyPlan | None, dict[str, Any]]:
    native_src = is_native(src)
    extra = sidecar_tensors(src) if native_src else {}
    ts = TensorSource.of(src, extra)
    sidecar = src.sidecar or {}
    dtype = DTYPES[DTYPE_ARGS[opts.dtype]]
    if native_src:
        plan = plan_from_native(src, adapter)
        recorded, source_dtypes = plan.quant, sidecar.get("source", {}).get("dtypes", {})
        items = []
        for t in plan.tensors:
            if t.kind == "zeros" and t.key in plan.injected and sidecar:
                continue
            info = src.tensors[t.key]
            for k, shape in hf_shapes(t, info).items():
                enc = choose(k, info.dtype, opts.quantize, recorded, source_dtypes, adapter)
                items.append(HfItem(enc, shape, t, info.dtype))
    else:
        plan = None
        recorded, companions = find_quant(src.tensors)
        source_dtypes = {k: v.dtype for k, v in src.tensors.items()}
        items = []
        for k, info in src.tensors.items():
            if k in companions or k.endswith("_scale_inv"):
                continue
            value_dtype = DTYPE_ARGS[opts.dtype] if k in recorded else info.dtype
            enc = choose(k, value_dtype, opts.quantize, recorded, source_dtypes, adapter)
            items.append(HfItem(enc, info.shape, None, value_dtype))

    def scale_info(key):
        return ts.info(key)

    encoders = {it.enc.key: Encoder(it.enc, it.shape, lambda k: ts.rows(k).to(dev)) for it in items}
    restore = _restorable(sidecar, items, encoders, scale_info, opts) if native_src else None
    if restore:
        out.raw_headers = restore
    else:
        anchor = {}
        for it in items:
            key = it.native.key if it.native else it.enc.key
            anchor[it.enc.key] = src.shards.index(src.tensors[key].file)
        used = sorted(set(anchor.values()))
        out.shards = [[] for _ in used]
        for it in sorted(items, key=lambda it: anchor[it.enc.key]):
            for k, dt, shape in encoders[it.enc.key].planned(scale_info):
                out.shards[used.index(anchor[it.enc.key])].append(PlannedTensor(k, dt, shape))
    out.layout()
    budget = STEP_BYTES[dev.type]

    def value_chunks(it: HfItem) -> Iterator[tuple[int, int, Callable[[], torch.Tensor]]]:
        if it.native is None:
            q = recorded.get(it.enc.key)
            info = src.tensors[it.enc.key]
            align = max(hf_align(q.kind if q else None, info.shape), hf_align(it.enc.scale_kind, it.shape))
            for r0, r1 in row_chunks(info.shape, info.torch_dtype.itemsize, budget, align):
                yield r0, r1, lambda r0=r0, r1=r1: hf_value(ts, recorded, it.enc.key, r0, r1, dtype, dev)
            return
        t = it.native
        info = src.tensors[t.key]
        if t.kind == "stack":
            e = t.parts.index(it.enc.key) // t.names
            j = t.parts.index(it.enc.key) % t.names
            yield (
                0,
                it.shape[0],
                lambda: torch.chunk(ts.rows(t.key, e, e + 1).to(dev)[0], t.names, -1)[j].T.contiguous(),
            )
            return
        align = hf_align(it.enc.scale_kind, it.shape)
        for r0, r1 in row_chunks(info.shape, info.torch_dtype.itemsize, budget, align):
            yield r0, r1, lambda r0=r0, r1=r1: inverse(t, ts.rows(t.key, r0, r1).to(dev), r0)[it.enc.key]

    def steps() -> Iterator[Step]:
        for it in items:
            encoder = encoders[it.enc.key]
            if encoder.needs_amax:
                amax = torch.zeros((), device=dev)
                for _, _, get in value_chunks(it):
                    amax = torch.maximum(amax, get().float().abs().max())
                encoder.set_amax(amax)
            chunks = list(value_chunks(it))
            for i, (r0, _, get) in enumerate(chunks):
                last = i == len(chunks) - 1

                def compute(x, r0=r0, encoder=encoder, last=last, it=it):
                    x = x if it.shape else x.reshape(())
                    for key, row, piece in encoder.rows(x, r0):
                        out.write(key, row, piece, last)
                    if last:
                        for key, row, piece in encoder.finish():
                            out.write(key, row, piece, True)
                    progress({"bytes_in": piece.numel()})

                yield get, compute

    run_steps(steps())
    config = _hf_config(src, sidecar, items, adapter, opts, native_src)
    return plan, config


def _restorable(sidecar, items, encoders, scale_info, opts) -> dict[str, bytes] | None:
    """Source shard headers to reuse verbatim when keep reproduces exactly the source's tensors."""
    headers = sidecar.get("source", {}).get("headers")
    if opts.quantize != "keep" or not headers:
        return None
    produced = {}
    for it in items:
        for k, dt, shape in encoders[it.enc.key].planned(scale_info):
            produced[k] = (dt, list(shape))
    raw = {name: base64.b64decode(h) for name, h in headers.items()}
    recorded = {}
    for header in raw.values():
        for k, v in json.loads(header).items():
            if k != "__metadata__":
                recorded[k] = (v["dtype"], v["shape"])
    return raw if recorded == produced else None


def _hf_config(src, sidecar, items, adapter, opts, native_src) -> dict[str, Any]:
    config = copy.deepcopy(src.config)
    original = sidecar.get("source", {}).get("config") if native_src else src.config
    for c in (config, config.get("text_config")):
        if isinstance(c, dict):
            c.pop("quantization_config", None)
    if opts.quantize == "keep" and any(it.enc.mode == "keep" for it in items) and original:
        for c, o in ((config, original), (config.get("text_config"), original.get("text_config"))):
            if isinstance(c, dict) and isinstance(o, dict) and "quantization_config" in o:
                c["quantization_config"] = o["quantization_config"]
        return config
    qc = quantization_config([it.enc for it in items], adapter, opts.quantize)
    if qc:
        config["quantization_config"] = qc
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["quantization_config"] = qc
    return config


# ------------------------------------------------------------------------------------------ top level


def open_source(src: str | os.PathLike[str] | Source) -> Source:
    return src if hasattr(src, "read_range") else LocalSource(src)


def convert(
    src: str | os.PathLike[str] | Source,
    dst: str | os.PathLike[str],
    opts: Options,
    progress: Progress | None = None,
) -> Report:
    """Convert ``src`` into a new checkpoint at ``dst``; raises with the report if verification fails."""
    opts.validate()
    started = time.monotonic()
    progress = progress or (lambda _: None)
    ckpt = open_checkpoint(open_source(src))
    adapter = _adapter_for(ckpt, opts.adapter)
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not opts.overwrite:
        raise TargetExistsError(f"{dst} already holds files; pass --overwrite to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = dst.with_name(f".{dst.name}.recast-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    out = Output(stage)
    dev = opts.torch_device()
    try:
        if opts.to == "native":
            if is_native(ckpt):
                raise RecastError(f"{ckpt.source.description} is already a native checkpoint; use --to hf")
            plan, config = _to_native(ckpt, adapter, opts, out, dev, progress)
        else:
            plan, config = _to_hf(ckpt, adapter, opts, out, dev, progress)
        where = out.close()
        _write_rest(ckpt, stage, out, where, config, plan, adapter, opts)
        report = Report.start(ckpt, adapter, opts, "native" if opts.to == "native" else "hf")
        if opts.verify:
            from .verify import verify_dirs

            verify_dirs(ckpt, LocalSource(stage), report, dev)
        report.seconds = time.monotonic() - started
        report.bytes_in = ckpt.total_bytes
        report.bytes_out = sum(p.stat().st_size for p in stage.iterdir() if p.name.endswith(".safetensors"))
        _finish_sidecar(stage, report)
        if opts.verify and not report.passed:
            raise VerificationError(f"verification failed: {report.failure_summary()}", report)
        _publish(stage, dst)
        return report
    except BaseException:
        out.abort()
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _adapter_for(ckpt: Checkpoint, name: str | None) -> Adapter:
    if name is None and ckpt.sidecar and ckpt.sidecar.get("adapter"):
        name = ckpt.sidecar["adapter"]
    return detect(ckpt.config, list(ckpt.tensors), name)


def _write_rest(ckpt, stage: Path, out: Output, where, config, plan, adapter, opts) -> None:
    """Sidecar scales, config, carried files, index (last of the weights), then recast.json."""
    source = ckpt.source
    for name in ckpt.extra_files:
        target = stage / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_range(name, 0, source.size(name)))
    native_out = opts.to == "native"
    sidecar: dict[str, Any] = {
        "recast": 1,
        "format": "native" if native_out else "hf",
        "adapter": adapter.name,
        "layout": adapter.layout(list(ckpt.tensors)),
        "options": {k: v for k, v in asdict(opts).items() if k not in ("overwrite",)},
    }
    prev = ckpt.sidecar or {}
    if native_out:
        scale_keys = sorted({k for q in plan.quant.values() for k in (q.scale, q.activation) if k})
        if scale_keys:
            ts = TensorSource.of(ckpt)
            tensors = [PlannedTensor(k, ckpt.tensors[k].dtype, ckpt.tensors[k].shape) for k in scale_keys]
            w = ShardWriter.planned(stage / SIDECAR_TENSORS, tensors, {"format": "pt"})
            for k in scale_keys:
                w.write(k, ts.rows(k))
            w.close()
        sidecar["plan"] = plan.to_json()
        sidecar["source"] = {
            "location": opts.source_location or ckpt.source.description,
            "revision": opts.source_revision,
            "config": ckpt.config,
            "dtypes": {k: v.dtype for k, v in ckpt.tensors.items()},
            "headers": {n: base64.b64encode(h.raw).decode() for n, h in ckpt.headers.items()},
            "index": ckpt.index_raw.decode() if ckpt.index_raw else None,
            "config_raw": ckpt.config_raw.decode(),
        }
    else:
        sidecar["source"] = {
            "location": opts.source_location or ckpt.source.description,
            "revision": opts.source_revision,
        }
    restored = (
        native_out is False
        and out.raw_headers
        and prev.get("source", {}).get("config") == _comparable(config)
    )
    config_bytes = (
        prev["source"]["config_raw"].encode() if restored else (json.dumps(config, indent=2) + "\n").encode()
    )
    (stage / "config.json").write_bytes(config_bytes)
    if restored and prev["source"].get("index"):
        (stage / INDEX).write_text(prev["source"]["index"])
    else:
        total = sum(h.tensors[k].nbytes for h in _headers(stage, out) for k in h.tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(where.items()))}
        (stage / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (stage / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config))


def _headers(stage: Path, out: Output) -> list[ShardHeader]:
    src = LocalSource(stage)
    return [parse_header(src, n) for n in out.names()]


def _finish_sidecar(stage: Path, report: Report) -> None:
    sidecar = json.loads((stage / SIDECAR).read_text())
    files = {}
    for p in sorted(stage.rglob("*")):
        if p.is_file() and p.name != SIDECAR:
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(8 << 20), b""):
                    h.update(block)
            files[p.relative_to(stage).as_posix()] = h.hexdigest()
    sidecar["files"] = files
    sidecar["verification"] = report.summary()
    (stage / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
    report.files = files


def _publish(stage: Path, dst: Path) -> None:
    """Swap the staged directory into place; an old target is removed only after the swap."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(stage, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

