"""→ hf: from native (the adapter inverted, re-quantized with the recorded or fresh scales) or from
hf (dequantized, or quantized afresh).

Every hf tensor has an ``Encoding``; its work units compute rows of its value, encode them, and,
when verifying, decode what they are about to write and hold it against the source rows still in
memory: the same bits where the step is lossless, within the e4m3 bound where it is not. Units are
scheduled in the order of the bytes they write, so each shard is written front to back even when it
reuses a source's own header (scales first, as the safetensors library lays them out).
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .adapters import Adapter
from .checkpoint import Checkpoint
from .checks import Checks, same_bits
from .direction import Direction, account_rest
from .encode import Encoder, Encoding, choose, quantization_config
from .errors import CheckpointError, RecastError
from .formats import hf_side, is_native, sidecar_tensors
from .fp8 import decode, encode, expand_scale, value_shape
from .hostpool import HostPool
from .keymap import (
    KeyPlan,
    NativeTensor,
    as_unquantized,
    plan_from_native,
    quantized_shards,
    source_quant,
    unpacked,
    unpacked_name,
)
from .layout import Layout
from .operations import ranges, whole
from .options import DTYPE_ARGS, STEP_BYTES, Options
from .pipeline import Fetched, Piece, Unit
from .qformat import FORMATS, QUANTIZATION_FIELDS, QuantFormat, source_format
from .report import Report, TensorResult
from .safetensors_io import DTYPES, PlannedTensor
from .tensors import TensorSource, fetch, hf_align, hf_shapes, hf_value, inverse_views, row_chunks


@dataclass
class HfItem:
    """One hf tensor to produce: where its value comes from and how it is encoded."""

    enc: Encoding
    shape: tuple[int, ...]
    native: NativeTensor | None
    value_dtype: str
    # A fused hf tensor's split pieces (operations.Split), in row order; ``native`` is the first.
    pieces: tuple[NativeTensor, ...] = ()
    # From an hf source: the source tensor, where it is written under another name (packed codes not kept).
    renamed_from: str | None = None

    @property
    def source(self) -> str:
        """The hf source tensor read for this one (an hf source's; ``enc.key`` for a native one's)."""
        return self.renamed_from or self.enc.key


def to_hf(src: Checkpoint, adapter: Adapter, opts: Options, dev: torch.device) -> Direction:
    native_src = is_native(src)
    ts = TensorSource.of(src, sidecar_tensors(src) if native_src else {})
    sidecar = src.sidecar or {}
    dtype = DTYPES[DTYPE_ARGS[opts.dtype]]
    plan: KeyPlan | None = None
    companions: list[str] = []
    items: list[HfItem] = []
    source_fmt = source_format(*hf_side(src))
    fmt = FORMATS[opts.format] if opts.format else source_fmt
    formats = {"fmt": fmt, "source_fmt": source_fmt}
    if native_src:
        plan = plan_from_native(src, adapter)
        if opts.quantize != "keep":
            plan = unpacked(plan, source_fmt)
        recorded, source_dtypes = plan.quant, sidecar.get("source", {}).get("dtypes", {})
        joined = _joined(src, plan)
        for t in plan.tensors:
            if t.kind == "zeros" and t.key in plan.injected and sidecar:
                continue
            info = src.tensors[t.key]
            if t.kind == "split":
                key = t.parts[0]
                pieces = joined.pop(key, None)
                if pieces is not None:  # the fused tensor, planned where its first piece is
                    shape = (max(p.rows[-1] for p in pieces), *info.shape[1:])
                    enc = choose(
                        key, shape, info.dtype, opts.quantize, recorded, source_dtypes, adapter, **formats
                    )
                    if enc.mode != "keep":
                        pieces = sorted(
                            (as_unquantized(adapter, src.config, p) for p in pieces), key=lambda p: p.rows[0]
                        )
                    items.append(HfItem(enc, shape, pieces[0], info.dtype, tuple(pieces)))
                continue
            for k, shape in hf_shapes(t, info).items():
                items.append(
                    HfItem(
                        choose(
                            k, shape, info.dtype, opts.quantize, recorded, source_dtypes, adapter, **formats
                        ),
                        shape,
                        t,
                        info.dtype,
                    )
                )
    else:
        recorded, companions = source_quant(src, source_fmt)
        source_dtypes = {k: v.dtype for k, v in src.tensors.items()}
        for k, info in src.tensors.items():
            if k in companions:
                continue
            value_dtype = DTYPE_ARGS[opts.dtype] if k in recorded else info.dtype
            shape = value_shape(recorded[k].kind, info.shape) if k in recorded else info.shape
            # codes stored under a name of their own (Kimi K3's K.weight_packed) not kept go out under their
            # weight's name, read under the source's (HfItem.renamed_from)
            out = None if opts.quantize == "keep" else unpacked_name(k, recorded, source_fmt)
            enc = choose(
                out or k, shape, value_dtype, opts.quantize, recorded, source_dtypes, adapter, **formats
            )
            if k in recorded:
                _check_kept_shards(src, adapter, k, enc)
            items.append(HfItem(enc, shape, None, value_dtype, renamed_from=k if out else None))
    read_quant = {} if native_src else recorded
    encoders = {it.enc.key: Encoder(it.enc, it.shape, lambda k: ts.rows(k).to(dev)) for it in items}
    produces = {it.enc.key: encoders[it.enc.key].planned(ts.info) for it in items}
    layout = Layout(raw_headers=(_restorable(sidecar, produces, opts) if native_src else None) or {})
    if not layout.raw_headers:
        anchor = {
            it.enc.key: src.shards.index(src.tensors[it.native.key if it.native else it.source].file)
            for it in items
        }
        used = sorted(set(anchor.values()))
        layout.shards = [[] for _ in used]
        for it in sorted(items, key=lambda it: anchor[it.enc.key]):
            for k, dt, shape in produces[it.enc.key]:
                layout.shards[used.index(anchor[it.enc.key])].append(PlannedTensor(k, dt, shape))
    layout.fix()
    budget = STEP_BYTES[dev.type]
    pool = HostPool() if dev.type == "cuda" else None
    to_host = pool.to_host if pool else torch.Tensor.cpu
    lossy_ok = opts.quantize != "none"

    def written_value(it: HfItem, pieces: list[Piece], r0: int, n: int, as_dtype: torch.dtype):
        """Decode what is about to be written for rows ``r0…`` (n of them); with its expanded scale."""
        enc, encoder = it.enc, encoders[it.enc.key]
        mine = {key: t for key, _, t in pieces}
        w = mine[enc.key].to(dev)
        if enc.mode is None:  # as_dtype may be wider than what is written (operations.Fp32)
            return w.to(as_dtype), None
        if enc.mode in ("block", "per-channel"):
            scale, rows, shape = mine[enc.scale_key].to(dev), slice(0, n), tuple(w.shape)
        else:
            scale, rows, shape = encoder._scale.to(dev), slice(r0, r0 + n), it.shape
        value = decode(w, encoder.kind, scale, rows, shape, as_dtype)
        expanded = expand_scale(encoder.kind, scale, rows, shape)
        return value, expanded

    def check(
        it: HfItem, x: torch.Tensor, pieces: list[Piece], r0: int, ref: torch.Tensor, checks: Checks
    ) -> None:
        """Decode the written rows and hold them against the source rows ``ref`` (raw source bytes
        for an hf source, the native rows laid out as this hf tensor for a native one)."""
        key, n = it.enc.key, (x.shape[0] if x.dim() else 1)
        dq = it.enc.mode is not None
        q = None if native_src else recorded.get(it.source)
        target = ref.dtype if native_src else (dtype if q else DTYPES[src.tensors[it.source].dtype])
        value, scale = written_value(it, pieces, r0, n, target)
        rebuilt = (
            value
            if q is None
            else encode(value, q.kind, ts.rows(q.scale).to(dev), _rows(it, r0, n), it.shape)
        )
        if not native_src and q is None and not dq:
            rebuilt = value.to(ref.dtype)
        exact = same_bits(rebuilt.reshape(ref.shape), ref)
        if exact and q is not None:  # and the written value is exactly those source bytes dequantized
            source_scale = ts.rows(q.scale).to(dev)
            rows = _rows(it, r0, n)
            exact = same_bits(decode(ref.to(dev), q.kind, source_scale, rows, it.shape, value.dtype), value)
        if exact:
            checks.bitwise(key, n, True)
        elif not (lossy_ok or dq):
            checks.bitwise(key, n, False, "not bit-identical after the round trip")
        elif it.enc.scale_kind is not None and it.enc.scale_kind.exact_only:
            checks.bitwise(
                key, n, False, f"not exactly {it.enc.scale_kind.value} values under the recorded scales"
            )
        else:
            original = ref if native_src else x
            restored = written_value(it, pieces, r0, n, torch.float32)[0]
            checks.bounded(key, n, original, restored.reshape(original.shape), scale)

    def ensure_amax(it: HfItem) -> None:
        encoder = encoders[it.enc.key]
        if encoder.needs_amax:
            amax = torch.zeros((), device=dev)
            for r0, r1, reads in chunks(it):
                got = fetch(ts, read_quant, reads)
                amax = torch.maximum(amax, values(it, got, r0, r1)[0].float().abs().max())
            encoder.set_amax(amax)

    def chunks(it: HfItem) -> list[tuple[int, int, list]]:
        """Row ranges of an hf tensor (not a stacked expert part) and the source reads each needs."""
        if it.native is None:
            q = recorded.get(it.source)
            info = src.tensors[it.source]
            align = max(hf_align(q.kind if q else None, info.shape), hf_align(it.enc.scale_kind, it.shape))
            spans = row_chunks(info.shape, info.torch_dtype.itemsize, budget, align)
            return [(r0, r1, [(it.source, r0, r1)]) for r0, r1 in spans]
        if it.pieces:  # hf rows r0:r1 from the pieces they overlap
            itemsize = src.tensors[it.native.key].torch_dtype.itemsize
            spans = row_chunks(it.shape, itemsize, budget, hf_align(it.enc.scale_kind, it.shape))
            return [(r0, r1, _piece_reads(it, r0, r1)) for r0, r1 in spans]
        info = src.tensors[it.native.key]
        if it.native.kind == "stack":
            e = it.native.parts.index(it.enc.key) // it.native.names
            return [(0, it.shape[0], [(it.native.key, e, e + 1)])]
        if whole(it.native.kind):
            return [(0, it.shape[0], [(it.native.key, None, None)])]
        spans = row_chunks(
            info.shape, info.torch_dtype.itemsize, budget, hf_align(it.enc.scale_kind, it.shape)
        )
        return [(r0, r1, [(it.native.key, r0, r1)]) for r0, r1 in spans]

    def values(it: HfItem, got: Fetched, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The hf rows' value, and the source rows they are checked against."""
        if it.native is None:
            x = hf_value(ts, recorded, it.source, r0, r1, dtype, dev, got)
            return x, got[(it.source, r0, r1)]
        t = it.native
        if it.pieces:
            x = torch.cat([got[read].to(dev) for read in _piece_reads(it, r0, r1)])
            return x, x
        if t.kind == "stack":
            e = t.parts.index(it.enc.key) // t.names
            native, e0 = got[(t.key, e, e + 1)], e
        elif whole(t.kind):
            native, e0 = got[(t.key, None, None)], 0
        else:
            native, e0 = got[(t.key, r0, r1)], r0
        if not src.tensors[t.key].shape:
            native = native.reshape(())
        view = next(v for k, _, _, v in inverse_views(t, native.to(dev), e0) if k == it.enc.key)
        return view.contiguous(), view

    def units(name: str, checks: Checks | None) -> Iterator[Unit]:
        keys = {k for k, n in layout.where.items() if n == name}
        planned: list[tuple[int, Unit]] = []
        for it in items:
            encoder = encoders[it.enc.key]
            if it.enc.key in keys:
                for r0, r1, reads in chunks(it):
                    run = rows_unit(it, encoder, r0, r1, keys, checks)
                    planned.append((layout.offset(it.enc.key) + r0, Unit(reads, run, _read_bytes(ts, reads))))
            tail = [k for k in _tail_keys(it.enc) if k in keys]
            if tail:
                planned.append(
                    (min(layout.offset(k) for k in tail), Unit([], tail_unit(it, encoder, keys), 0))
                )
        planned.sort(key=lambda p: p[0])
        yield from (u for _, u in planned)

    def rows_unit(it: HfItem, encoder: Encoder, r0: int, r1: int, keys: set[str], checks: Checks | None):
        def run(got: Fetched) -> list[Piece]:
            ensure_amax(it)
            x, ref = values(it, got, r0, r1)
            if not it.shape:
                x, ref = x.reshape(()), ref.reshape(())
            pieces = [(k, row, to_host(t)) for k, row, t in encoder.rows(x, r0)]
            if checks is not None:
                with checks.timings.timed("verify"):
                    check(it, x, pieces, r0, ref, checks)
            for key, _, t in pieces:
                if key not in keys and pool is not None:
                    pool.give(t)  # another shard's piece, computed alongside
            return [p for p in pieces if p[0] in keys]

        return run

    def tail_unit(it: HfItem, encoder: Encoder, keys: set[str]):
        def run(_: Fetched) -> list[Piece]:
            ensure_amax(it)
            return [(k, row, to_host(t)) for k, row, t in encoder.finish() if k in keys]

        return run

    def expected() -> dict[str, int]:
        return {it.enc.key: (it.shape[0] if it.shape else 1) for it in items}

    def account(report: Report) -> None:
        if native_src:
            for t in plan.tensors:
                if t.kind == "zeros" and t.key in plan.injected and sidecar:
                    ok = t.key not in layout.where
                    report.add(
                        TensorResult(t.key, "bitwise", ok, None, "" if ok else "injected key not removed")
                    )
                    report.accounting["dropped"].append(t.key)
                else:
                    report.accounting["mapped"].append(t.key)
        else:
            report.accounting["mapped"].extend(it.source for it in items)
            report.accounting["scales"].extend(companions)
        account_rest(src, report)

    return Direction(
        plan=plan,
        layout=layout,
        config=_hf_config(src, sidecar, items, adapter, opts, native_src, fmt, source_fmt),
        units=units,
        fetch=lambda reads: fetch(ts, read_quant, reads, pool),
        expected=expected,
        account=account,
        pool=pool,
    )


def _check_kept_shards(src: Checkpoint, adapter: Adapter, key: str, enc: Encoding) -> None:
    """Refuse re-encoding, other than keeping, a quantized source tensor saved shard by shard whose family reads an
    unquantized one in part order (MiMo-V2.5-Pro's qkv_proj): written here as it lies, it would be misread;
    the way through the native layout regroups it."""
    rule = quantized_shards(adapter, key)
    n = rule.shard_count(src.config, src.index_metadata) if rule is not None else 1
    if n == 1 or enc.mode == "keep":
        return
    raise RecastError(
        f"{key!r} is saved as {n} tensor-parallel shards ({rule.shards_from}) because it "
        f"is quantized; {adapter.name}'s loaders read an unquantized one in {' | '.join(rule.parts)} order, "
        "which re-encoding it in place would not give. Keep its scales (--quantize keep), or convert "
        "--to native and from there --to hf"
    )


def _joined(src: Checkpoint, plan: KeyPlan) -> dict[str, list[NativeTensor]]:
    """The split pieces of each fused hf tensor, the first rows' first; refuses pieces whose row ranges do
    not tile it."""
    out: dict[str, list[NativeTensor]] = {}
    for t in plan.tensors:
        if t.kind == "split":
            out.setdefault(t.parts[0], []).append(t)
    for key, pieces in out.items():
        pieces.sort(key=lambda t: t.rows[0])
        end = 0
        for a, b, piece in sorted(((a, b, p) for p in pieces for a, b in ranges(p.rows)), key=lambda r: r[0]):
            info = src.tensors[piece.key]
            if a != end or not info.shape or info.shape[0] != sum(y - x for x, y in ranges(piece.rows)):
                raise CheckpointError(
                    f"{info.file}: {piece.key!r} ({list(info.shape)}) is not rows {piece.rows} of {key!r} that "
                    f"tile it with its other pieces {[p.key for p in pieces if p is not piece]}"
                )
            end = b
    return out


def _piece_reads(it: HfItem, r0: int, r1: int) -> list[tuple[str, int, int]]:
    """The native rows that hold hf rows ``r0:r1`` of a fused tensor, in hf row order."""
    reads = []
    for t in it.pieces:
        at = 0
        for a, b in ranges(t.rows):
            if a < r1 and r0 < b:
                reads.append((max(r0, a), (t.key, at + max(r0, a) - a, at + min(r1, b) - a)))
            at += b - a
    return [read for _, read in sorted(reads)]


def _tail_keys(enc: Encoding) -> list[str]:
    """What ``Encoder.finish`` writes once per tensor: a kept or per-tensor scale, an activation scale."""
    keys = [enc.scale_key] if enc.mode in ("keep", "per-tensor") else []
    return keys + [k for k in (enc.activation_out, enc.zero_point) if k]


def _read_bytes(ts: TensorSource, reads: list) -> int:
    total = 0
    for key, a, b in reads:
        info = ts.info(key)
        rows = info.shape[0] if info.shape else 1
        total += info.nbytes if a is None or not info.shape else info.nbytes * (b - a) // max(rows, 1)
    return total


def _rows(it: HfItem, r0: int, n: int) -> slice:
    return slice(r0, r0 + n) if it.shape else slice(0, 1)


def _restorable(sidecar: dict[str, Any], produces: dict[str, list], opts: Options) -> dict[str, bytes] | None:
    """Source shard headers to reuse verbatim when keep reproduces exactly the source's tensors."""
    headers = sidecar.get("source", {}).get("headers")
    if opts.quantize != "keep" or not headers:
        return None
    produced = {k: (dt, list(shape)) for planned in produces.values() for k, dt, shape in planned}
    raw = {name: base64.b64decode(h) for name, h in headers.items()}
    recorded = {}
    for header in raw.values():
        for k, v in json.loads(header).items():
            if k != "__metadata__":
                recorded[k] = (v["dtype"], v["shape"])
    return raw if recorded == produced else None


def _hf_config(
    src, sidecar, items, adapter, opts, native_src, fmt: QuantFormat, source_fmt: QuantFormat
) -> dict[str, Any]:
    config = copy.deepcopy(src.config)
    original = sidecar.get("source", {}).get("config") if native_src else src.config
    for c in (config, config.get("text_config")):
        if isinstance(c, dict):
            for name in QUANTIZATION_FIELDS:
                c.pop(name, None)
    kept = opts.quantize == "keep" and any(it.enc.mode == "keep" for it in items)
    if kept and original and fmt is source_fmt:
        for c, o in ((config, original), (config.get("text_config"), original.get("text_config"))):
            if isinstance(c, dict) and isinstance(o, dict):
                c.update({name: o[name] for name in QUANTIZATION_FIELDS if name in o})
        return config
    qc = quantization_config([it.enc for it in items], adapter, fmt)
    if qc:
        config["quantization_config"] = qc
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["quantization_config"] = qc
    return config
