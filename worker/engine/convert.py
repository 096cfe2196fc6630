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
from .checkpoint import INDEX, MANIFEST, SIDECAR, SIDECAR_TENSORS, Checkpoint, open_checkpoint
from .encode import QUANTIZE_MODES, Encoder, Encoding, choose, quantization_config
from .errors import RecastError, TargetExistsError, VerificationError
from .keymap import KeyPlan, NativeTensor, find_quant, plan_from_hf, plan_from_native
from .report import Report
from .safetensors_io import DTYPES, PlannedTensor, ShardWriter, parse_header
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
    """The output's shard layout, planned up front; shards are written one at a time into a directory.

    Work units may produce tensors of several shards (a weight and its scale can live apart in a
    restored layout); ``write`` keeps only the pieces of the shard being produced.
    """

    shards: list[list[PlannedTensor]] = field(default_factory=list)
    raw_headers: dict[str, bytes] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    _writer: ShardWriter | None = None
    _active: str | None = None

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

    def keys(self, name: str) -> set[str]:
        return {k for k, v in self.where.items() if v == name}

    def total_bytes(self) -> int:
        if self.raw_headers:
            return sum(
                v["data_offsets"][1] - v["data_offsets"][0]
                for raw in self.raw_headers.values()
                for k, v in json.loads(raw).items()
                if k != "__metadata__"
            )
        return sum(t.nbytes for tensors in self.shards for t in tensors)

    def open(self, name: str, directory: Path) -> None:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self._active = name
        if self.raw_headers:
            self._writer = ShardWriter.from_raw_header(path, self.raw_headers[name])
        else:
            tensors = self.shards[self.names().index(name)]
            self._writer = ShardWriter.planned(path, tensors, {"format": "pt"})

    def write(self, key: str, row: int, t: torch.Tensor, last: bool) -> None:
        if self._writer is not None and self.where[key] == self._active:
            self._writer.write(key, t.cpu(), row, last)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def abort(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.abort()


# ------------------------------------------------------------------------------------------- execution


Step = tuple[Callable[[], Any], Callable[[Any], None]]
StepsFor = Callable[[str, Progress], Iterator[Step]]


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
    src: Checkpoint, adapter: Adapter, opts: Options, out: Output, dev: torch.device
) -> tuple[KeyPlan, dict[str, Any], StepsFor]:
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

    def steps(name: str, progress: Progress) -> Iterator[Step]:
        for t in order:
            if out.where[t.key] != name:
                continue
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

    config = copy.deepcopy(src.config)
    config.pop("quantization_config", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"].pop("quantization_config", None)
    return plan, config, steps


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
    src: Checkpoint, adapter: Adapter, opts: Options, out: Output, dev: torch.device
) -> tuple[KeyPlan | None, dict[str, Any], StepsFor]:
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

    produces = {it.enc.key: {k for k, _, _ in encoders[it.enc.key].planned(scale_info)} for it in items}

    def steps(name: str, progress: Progress) -> Iterator[Step]:
        for it in items:
            if not any(out.where[k] == name for k in produces[it.enc.key]):
                continue
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

    config = _hf_config(src, sidecar, items, adapter, opts, native_src)
    return plan, config, steps


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


@dataclass
class Conversion:
    """A conversion planned from headers alone: the output's shards are fixed up front and each can be
    produced on its own, in any process, in any order; the metadata files follow once all exist.

    ``convert`` runs it all on one machine; the job workers spread the shards over many.
    """

    ckpt: Checkpoint
    adapter: Adapter
    opts: Options
    dev: torch.device
    out: Output
    plan: KeyPlan | None
    config: dict[str, Any]
    _steps: StepsFor

    def shard_names(self) -> list[str]:
        return self.out.names()

    def write_shard(self, name: str, directory: Path, progress: Progress | None = None) -> Path:
        """Write output shard ``name`` under ``directory`` (complete or not at all)."""
        self.out.open(name, directory)
        try:
            run_steps(self._steps(name, progress or (lambda _: None)))
            self.out.close()
        except BaseException:
            self.out.abort()
            raise
        return directory / name

    def write_metadata(self, directory: Path) -> list[str]:
        """Scales sidecar, config, carried files, index and recast.json; returns the names written."""
        return _write_rest(self.ckpt, directory, self.out, self.config, self.plan, self.adapter, self.opts)

    def new_report(self) -> Report:
        return Report.start(self.ckpt, self.adapter, self.opts, self.opts.to)

    def verify(self, written: Source, report: Report) -> Report:
        from .verify import verify_dirs

        return verify_dirs(self.ckpt, written, report, self.dev)


def plan_conversion(src: str | os.PathLike[str] | Source, opts: Options) -> Conversion:
    """Open ``src`` from its headers and fix the output layout; raises RecastError on bad input."""
    opts.validate()
    ckpt = open_checkpoint(open_source(src))
    adapter = _adapter_for(ckpt, opts.adapter)
    dev = opts.torch_device()
    out = Output()
    if opts.to == "native":
        if is_native(ckpt):
            raise RecastError(f"{ckpt.source.description} is already a native checkpoint; use --to hf")
        plan, config, steps = _to_native(ckpt, adapter, opts, out, dev)
    else:
        plan, config, steps = _to_hf(ckpt, adapter, opts, out, dev)
    return Conversion(ckpt, adapter, opts, dev, out, plan, config, steps)


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
        for name in conv.shard_names():
            conv.write_shard(name, stage, progress)
        conv.write_metadata(stage)
        report = conv.new_report()
        if opts.verify:
            conv.verify(LocalSource(stage), report)
        report.seconds = time.monotonic() - started
        report.bytes_in = conv.ckpt.total_bytes
        report.bytes_out = conv.out.total_bytes()
        finish_sidecar(stage, report, hash_files(stage))
        if opts.verify and not report.passed:
            raise VerificationError(f"verification failed: {report.failure_summary()}", report)
        _publish(stage, dst)
        return report
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _adapter_for(ckpt: Checkpoint, name: str | None) -> Adapter:
    if name is None and ckpt.sidecar and ckpt.sidecar.get("adapter"):
        name = ckpt.sidecar["adapter"]
    return detect(ckpt.config, list(ckpt.tensors), name)


def _write_rest(ckpt, stage: Path, out: Output, config, plan, adapter, opts) -> list[str]:
    """Sidecar scales, config, carried files, index (last of the weights), then recast.json."""
    source = ckpt.source
    written = [*ckpt.extra_files, "config.json", INDEX, SIDECAR]
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
            written.insert(0, SIDECAR_TENSORS)
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
        index = {"metadata": {"total_size": out.total_bytes()}, "weight_map": dict(sorted(out.where.items()))}
        (stage / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (stage / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
    return written


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_files(stage: Path) -> dict[str, str]:
    return {
        p.relative_to(stage).as_posix(): file_sha256(p)
        for p in sorted(stage.rglob("*"))
        if p.is_file() and p.name not in (SIDECAR, MANIFEST)
    }


def finish_sidecar(stage: Path, report: Report, files: dict[str, str]) -> list[str]:
    """Record the verification and every file's SHA-256 in recast.json; write the SHA256SUMS manifest.

    The manifest covers every published file, recast.json included, in ``sha256sum -c`` format.
    """
    sidecar = json.loads((stage / SIDECAR).read_text())
    sidecar["files"] = dict(sorted(files.items()))
    sidecar["verification"] = report.summary()
    (stage / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
    report.files = sidecar["files"]
    every = {**sidecar["files"], SIDECAR: file_sha256(stage / SIDECAR)}
    (stage / MANIFEST).write_text("".join(f"{h}  {n}\n" for n, h in sorted(every.items())))
    return [SIDECAR, MANIFEST]


def _publish(stage: Path, dst: Path) -> None:
    """Swap the staged directory into place; an old target is removed only after the swap."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(stage, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

