"""Round-trip verification: rebuild the source from the destination and compare, bit for bit.

Lossless steps (renames, transposes, stacking, dequantization that re-quantizes to the same bytes)
must match exactly. A tensor that does not is accepted only where this conversion made a lossy step
(fresh quantization, re-quantization of changed weights, a narrowing cast), and then only within the
e4m3 bound ``|w - deq(q(w))| <= 2^-4 |w| + 2^-10 s``. Every source key must be accounted for.
"""

from __future__ import annotations

import torch

from .adapters import detect
from .checkpoint import Checkpoint, open_checkpoint
from .checks import Acc, same_bits
from .errors import CheckpointError
from .formats import hf_side, is_native, sidecar_tensors
from .fp8 import BLOCK, ScaleKind, dequantize_rows, expand_scale, quantize_rows, value_shape
from .keymap import KeyPlan, as_unquantized, plan_from_native, source_quant, unpacked, unpacked_name
from .options import DTYPE_ARGS
from .qformat import source_format
from .report import Report, TensorResult
from .safetensors_io import DTYPES
from .storage import Source
from .tensors import TensorSource, forward, hf_align, hf_value, inverse_views, row_chunks

STEP = 32 << 20


def verify_dirs(src: Checkpoint, dst_source: Source, report: Report, dev: torch.device) -> Report:
    """Check the checkpoint at ``dst_source`` against ``src``; fills ``report``."""
    dst = open_checkpoint(dst_source)
    sidecar = dst.sidecar or {}
    if not sidecar:
        raise CheckpointError(
            f"{dst_source.description}: no recast.json; it was not written by recast convert"
        )
    adapter = detect(src.config, list(src.tensors), sidecar.get("adapter"))
    options = sidecar.get("options", {})
    if sidecar.get("format") == "native":
        _verify_native_target(src, dst, report, dev)
    else:
        _verify_hf_target(src, dst, adapter, options, report, dev)
    report.verified = True
    return report


def _verify_native_target(src: Checkpoint, dst: Checkpoint, report: Report, dev: torch.device) -> None:
    """hf → native: split/transpose the native tensors back, re-quantize with the source scales."""
    plan = KeyPlan.from_json(dst.sidecar["plan"])
    sts = TensorSource.of(src)
    dts = TensorSource.of(dst, sidecar_tensors(dst))
    quant, companions = source_quant(src)
    expected_keys = {t.key for t in plan.tensors}
    if set(dst.tensors) != expected_keys:
        extra, missing = set(dst.tensors) - expected_keys, expected_keys - set(dst.tensors)
        report.problems.append(
            f"native tensors differ from the plan: extra {sorted(extra)[:3]}, missing {sorted(missing)[:3]}"
        )
    accs: dict[str, Acc] = {}
    for t in plan.tensors:
        if t.key not in dst.tensors:
            continue
        info = dst.tensors[t.key]
        if t.kind == "zeros":
            ok = t.key not in src.tensors and not bool(dts.rows(t.key).any()) and info.shape == (t.experts,)
            report.add(TensorResult(t.key, "bitwise", ok, None, "" if ok else "injected tensor is not zeros"))
            report.accounting["injected"].append(t.key)
            continue
        per_row = info.nbytes // max(info.shape[0], 1) if info.shape else info.nbytes
        align = 1
        if t.kind in ("copy", "split") and t.parts[0] in quant:
            align = hf_align(quant[t.parts[0]].kind, src.tensors[t.parts[0]].shape)
        for e0, e1 in row_chunks(info.shape, per_row, STEP, align) if info.shape else [(None, None)]:
            native = dts.rows(t.key, e0, e1).to(dev)
            for key, a, b, view in inverse_views(t, native if info.shape else native.reshape(()), e0 or 0):
                piece = view.contiguous()
                acc = accs.setdefault(key, Acc())
                if e0 is None:
                    a, b = None, None
                raw = sts.rows(key, a, b).to(dev)
                q = quant.get(key)
                if q is not None:
                    sinfo = src.tensors[key]
                    rows = slice(0, sinfo.shape[0]) if a is None else slice(a, b)
                    scale = sts.rows(q.scale).to(dev)
                    piece = piece.reshape(value_shape(q.kind, raw.shape))
                    # The written value must be exactly the source code dequantized, not merely a value
                    # that quantizes back to it (many bf16 values share one FP8 code).
                    if not same_bits(
                        dequantize_rows(raw, q.kind, scale, rows, sinfo.shape, piece.dtype), piece
                    ):
                        acc.passed = False
                        acc.detail = f"not the source's {q.kind.stored_dtype} values dequantized"
                    piece = quantize_rows(piece, q.kind, scale, rows, sinfo.shape)
                if not same_bits(
                    piece.reshape(raw.shape) if piece.numel() == raw.numel() else piece, raw.to(piece.dtype)
                ):
                    acc.passed = False
                    acc.detail = "re-created source bytes differ"
        report.accounting["mapped"].extend(t.parts)
    for key, acc in accs.items():
        report.add(acc.result(key))
    for key in companions:
        got = dts.extra.get(key)
        ok = got is not None and same_bits(dts.rows(key), sts.rows(key))
        report.add(
            TensorResult(key, "bitwise", ok, None, "" if ok else "recorded scale differs from the source")
        )
    report.accounting["scales"].extend(companions)
    _account(src, report)


def _verify_hf_target(src, dst, adapter, options, report: Report, dev: torch.device) -> None:
    """→ hf: dequantize the written tensors and rebuild each source tensor from them."""
    dquant, _ = source_quant(dst)
    dts = TensorSource.of(dst)
    lossy_ok = options.get("quantize") != "none"
    dtype = DTYPES[DTYPE_ARGS[options.get("dtype", "bf16")]]
    if is_native(src):
        sts = TensorSource.of(src, sidecar_tensors(src))
        plan = plan_from_native(src, adapter)
        fmt = source_format(*hf_side(src))
        if any(k not in dst.tensors and unpacked_name(k, plan.quant, fmt) in dst.tensors for k in plan.quant):
            plan = unpacked(plan, fmt)  # the codes were not kept: written under their weight's name
        for t in plan.tensors:
            if t.kind == "split" and t.parts[0] not in dquant:
                t = as_unquantized(adapter, src.config, t)
            info = src.tensors[t.key]
            if t.kind == "zeros" and src.sidecar:
                ok = all(k != t.key for k in dst.tensors)
                report.add(TensorResult(t.key, "bitwise", ok, None, "" if ok else "injected key not removed"))
                report.accounting["dropped"].append(t.key)
                continue
            acc = Acc()
            per_row = info.nbytes // max(info.shape[0], 1) if info.shape else info.nbytes
            for e0, e1 in row_chunks(info.shape, per_row, STEP, 128 if t.kind == "copy" else 1):
                expected = sts.rows(t.key, e0, e1).to(dev)
                if not info.shape:
                    expected = expected.reshape(())

                def get(k, a, b, dt, transposed=False):
                    return hf_value(dts, dquant, k, a, b, dt, dev, None, transposed)

                native_dtype = info.torch_dtype
                rebuilt = forward(
                    t,
                    e0,
                    e1,
                    lambda k, a, b, transposed=False, dt=native_dtype: get(k, a, b, dt, transposed).to(dt),
                )
                if same_bits(rebuilt.reshape(expected.shape), expected):
                    continue
                if not (lossy_ok or any(p in dquant for p in t.parts)) and info.torch_dtype == rebuilt.dtype:
                    acc.passed, acc.detail = False, "not bit-identical after the round trip"
                    continue
                r32 = forward(
                    t, e0, e1, lambda k, a, b, transposed=False: get(k, a, b, torch.float32, transposed)
                )
                scale = None
                if any(p in dquant for p in t.parts):
                    scale = forward(
                        t,
                        e0,
                        e1,
                        lambda k, a, b, transposed=False: _swap(
                            _expanded_scale(dts, dquant, k, a, b, dev), transposed
                        ),
                    )
                acc.bounded(expected, r32.reshape(expected.shape), scale)
            report.add(acc.result(t.key))
            report.accounting["mapped"].append(t.key)
        _account(src, report)
        return
    fmt = source_format(src.config, src.tensors)
    squant, companions = source_quant(src, fmt)
    sts = TensorSource.of(src)
    for key, info in src.tensors.items():
        if key in companions:
            continue
        # codes under a name of their own, written unquantized under their weight's (Kimi K3's K.weight_packed)
        out = key if key in dst.tensors else unpacked_name(key, squant, fmt) or key
        if out not in dst.tensors:
            report.add(TensorResult(key, "bitwise", False, None, "missing from the output"))
            continue
        acc = Acc()
        q, dq = squant.get(key), dquant.get(out)
        align = max(
            hf_align(q.kind if q else None, info.shape), hf_align(dq.kind if dq else None, info.shape)
        )
        for r0, r1 in row_chunks(
            info.shape, info.nbytes // max(info.shape[0], 1) if info.shape else 1, STEP, align
        ):
            raw = sts.rows(key, r0, r1).to(dev)
            value_dtype = dtype if q else info.torch_dtype
            value = hf_value(dts, dquant, out, r0, r1, value_dtype, dev)
            if q is not None:
                rows = slice(r0, r1) if info.shape else slice(0, 1)
                rebuilt = quantize_rows(value, q.kind, sts.rows(q.scale).to(dev), rows, info.shape)
            else:
                rebuilt = value.to(info.torch_dtype)
            if same_bits(rebuilt.reshape(raw.shape), raw):
                continue
            if dq is None and options.get("quantize") == "none":
                acc.passed, acc.detail = False, "not bit-identical after the round trip"
                continue
            original = hf_value(sts, squant, key, r0, r1, value_dtype, dev)
            restored = hf_value(dts, dquant, out, r0, r1, torch.float32, dev)
            scale = _expanded_scale(dts, dquant, out, r0, r1, dev) if dq else None
            acc.bounded(original, restored.reshape(original.shape), scale)
        report.add(acc.result(key))
        report.accounting["mapped"].append(key)
    report.accounting["scales"].extend(companions)
    _account(src, report)


def _expanded_scale(ts: TensorSource, quant, key: str, r0, r1, dev) -> torch.Tensor:
    info = ts.info(key)
    if r0 is None:
        r0, r1 = 0, info.shape[0]
    q = quant[key]
    rows = slice(r0, min(r1, info.shape[0]))
    # a split piece's rows may start inside a block: expand from the block's first row
    lo = r0 - r0 % BLOCK if q.kind is ScaleKind.BLOCK and len(info.shape) == 2 else r0
    s = expand_scale(q.kind, ts.rows(q.scale).to(dev), slice(lo, rows.stop), info.shape)
    s = s[r0 - lo :] if lo != r0 else s
    return s.expand((rows.stop - rows.start, *value_shape(q.kind, info.shape)[1:]))


def _swap(x: torch.Tensor, transposed: bool) -> torch.Tensor:
    return x.transpose(-1, -2) if transposed else x


def _account(src: Checkpoint, report: Report) -> None:
    seen = {k for group in ("mapped", "scales", "dropped", "injected") for k in report.accounting[group]}
    report.accounting["unaccounted"] = sorted(set(src.tensors) - seen)
