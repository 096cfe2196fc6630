"""hf → native: dequantize, rename, transpose or stack the experts, inject missing router biases.

Each work unit produces native rows from the hf bytes it read and, when verifying, proves them at
once: the written rows are split back by the adapter's inverse operation and re-quantized with the
source's own scale, and must give back the source's FP8 bytes exactly, while those bytes are still
in memory. The output shards follow the source's: a native tensor lives in the shard of its first
part, in source order, so shards are written front to back.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch

from .adapters import Adapter
from .checkpoint import Checkpoint
from .checks import Checks, same_bits
from .direction import Direction, account_rest
from .fp8 import decode, encode, exact_codes, value_shape
from .hostpool import HostPool
from .keymap import KeyPlan, NativeTensor, plan_from_hf
from .layout import Layout
from .operations import OPERATIONS, whole
from .options import DTYPE_ARGS, STEP_BYTES, Options
from .pipeline import Fetched, Piece, Unit
from .report import Report
from .safetensors_io import DTYPES, PlannedTensor
from .tensors import (
    TensorSource,
    fetch,
    forward,
    forward_requests,
    hf_align,
    hf_value,
    inverse_views,
    native_shape,
    row_chunks,
    value_infos,
)


def to_native(src: Checkpoint, adapter: Adapter, opts: Options, dev: torch.device) -> Direction:
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
    layout = Layout(shards=[[] for _ in used])
    shapes = {}
    values = value_infos(src.tensors, plan.quant)
    for t in order:
        shapes[t.key] = native_shape(t, values)
        dt = OPERATIONS[t.kind].native_dtype() or (
            dtype_name if t.parts[0] in plan.quant else src.tensors[t.parts[0]].dtype
        )
        layout.shards[used.index(shard_of[t.key])].append(PlannedTensor(t.key, dt, shapes[t.key]))
    layout.fix()
    budget = STEP_BYTES[dev.type]
    pool = HostPool() if dev.type == "cuda" else None
    to_host = pool.to_host if pool else torch.Tensor.cpu

    def value(got: Fetched):
        def get(k, a, b, transposed=False):
            return hf_value(ts, plan.quant, k, a, b, dtype, dev, got, transposed)

        return get

    def check(t: NativeTensor, e0: int, written: torch.Tensor, got: Fetched, checks: Checks) -> None:
        """Split the written rows back: each part must re-quantize to the source's bytes with the
        source's scale, and be exactly those bytes dequantized (many bf16 values share one FP8 code,
        so the first alone would pass a value off by an ulp)."""
        for key, a, b, piece in inverse_views(t, written.to(dev), e0):
            raw = got[(key, a, b)]
            info = src.tensors[key]
            n = (b - a) if a is not None and info.shape else (info.shape[0] if info.shape else 1)
            q = plan.quant.get(key)
            if q is None:  # compared in the written dtype, which may be wider (operations.Fp32)
                checks.bitwise(key, n, same_bits(piece.reshape(raw.shape), raw.to(piece.dtype)))
                continue
            scale = got[(q.scale, None, None)].to(dev)
            rows = (
                slice(a, b) if a is not None and info.shape else slice(0, info.shape[0] if info.shape else 1)
            )
            piece, raw = piece.reshape(value_shape(q.kind, raw.shape)), raw.to(dev)
            codes = exact_codes(piece, q.kind, scale, rows, info.shape)
            if codes is not None:
                ok = torch.equal(codes, raw.view(torch.uint8).to(torch.int16))
            else:
                ok = same_bits(encode(piece, q.kind, scale, rows, info.shape), raw)
                ok = ok and same_bits(decode(raw, q.kind, scale, rows, info.shape, piece.dtype), piece)
            if q.zero_point is not None and bool(ts.rows(q.zero_point).float().any()):
                checks.bitwise(key, n, False, f"zero point {q.zero_point!r} is not zero (asymmetric FP8)")
                continue
            checks.bitwise(key, n, ok)

    def units(name: str, checks: Checks | None) -> Iterator[Unit]:
        for t in order:
            if layout.where[t.key] != name:
                continue
            shape = shapes[t.key]
            if t.kind == "zeros":

                def inject(_: Fetched, t=t) -> list[Piece]:
                    zeros = forward(t, 0, t.experts, value({}))
                    if checks is not None:
                        checks.bitwise(
                            t.key, 1, t.key not in src.tensors and not zeros.any(), "not injected zeros"
                        )
                    return [(t.key, 0, zeros)]

                yield Unit([], inject, 0)
                continue
            first = src.tensors[t.parts[0]]
            q = plan.quant.get(t.parts[0])
            if t.kind == "stack":  # a row is one expert: all of its 2-D part tensors
                per_row = sum(src.tensors[p].nbytes for p in t.part_of(0))
            elif first.shape:  # a row of every part (one part, but for ``concat``)
                per_row = sum(src.tensors[p].nbytes // max(src.tensors[p].shape[0], 1) for p in t.parts)
            else:
                per_row = first.nbytes
            # a split piece starts on a block boundary of its source (the planner checks), as a copy does
            align = hf_align(q.kind if q else None, first.shape) if t.kind in ("copy", "split") else 1
            n = shape[0] if shape else 1
            spans = [(0, n)] if whole(t.kind) else row_chunks((n,), max(per_row, 1), budget, align)
            for e0, e1 in spans:
                reads = forward_requests(t, e0, e1)

                def run(got: Fetched, t=t, e0=e0, e1=e1, shape=shape) -> list[Piece]:
                    x = forward(t, e0, e1, value(got))
                    written = to_host(x if shape else x.reshape(()))
                    if checks is not None:
                        with checks.timings.timed("verify"):
                            check(t, e0, written, got, checks)
                    return [(t.key, e0, written)]

                nbytes = sum(src.tensors[p].nbytes for p in t.parts) * (e1 - e0) // max(n, 1)
                yield Unit(reads, run, nbytes)

    def expected() -> dict[str, int]:
        rows = {
            k: (src.tensors[k].shape[0] if src.tensors[k].shape else 1) for t in plan.tensors for k in t.parts
        }
        return rows | dict.fromkeys(plan.injected, 1) | dict.fromkeys(_companions(plan), 1)

    config = copy.deepcopy(src.config)
    config.pop("quantization_config", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"].pop("quantization_config", None)
    return Direction(
        plan=plan,
        layout=layout,
        config=config,
        units=units,
        fetch=lambda reads: fetch(ts, plan.quant, reads, pool),
        expected=expected,
        account=lambda report: _account(src, plan, report),
        sidecar_scales=_companions(plan),
        pool=pool,
    )


def _companions(plan: KeyPlan) -> list[str]:
    return sorted({k for q in plan.quant.values() for k in q.companions})


def _account(src: Checkpoint, plan: KeyPlan, report: Report) -> None:
    """Every source key is mapped or kept as a scale in the sidecar; injected keys are listed."""
    report.accounting["mapped"].extend(k for t in plan.tensors for k in t.parts)
    report.accounting["scales"].extend(_companions(plan))
    report.accounting["injected"].extend(plan.injected)
    account_rest(src, report)


def _gate_of(t: NativeTensor, plan: KeyPlan) -> str:
    gate = t.key[: -len("e_score_correction_bias")] + "weight"
    return next(p.parts[0] for p in plan.tensors if p.key == gate)


def _offset(src: Checkpoint, t: NativeTensor, plan: KeyPlan) -> int:
    return src.tensors[t.parts[0] if t.parts else _gate_of(t, plan)].start
