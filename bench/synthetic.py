"""Synthetic checkpoints for the benchmarks: tensors listed in file order, cut into shards, written fast.

Drawing and quantizing billions of normal values would take minutes, so ``write_checkpoint`` draws a pool
of normal values once and quantizes it with the scale ``amax / 448``. Every FP8 weight is a copy of that
quantized pool at a random offset (a 3-D expert tensor: one offset per expert), with random scales around
the pool's scale; every bf16 tensor is a slice of the pool times 0.02; norms are 1 plus noise, so that no
two tensors are equal. Imports torch only inside ``write_checkpoint``, which runs in a child process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

FP8_MAX = 448.0

# key, shape (as stored), kind: fp8 | scale | bf16 | norm | f32 | fp4 (int8, two e2m1 codes a byte) | e8m0
Spec = tuple[str, tuple[int, ...], str]
ITEMSIZE = {
    "fp8": 1,
    "scale": 4,
    "bf16": 2,
    "norm": 2,
    "f32": 4,
    "fp4": 1,
    "e8m0": 1,
    "fp4-u8": 1,
    "e8m0-u8": 1,
}


def spec_bytes(spec: Spec) -> int:
    return math.prod(spec[1]) * ITEMSIZE[spec[2]]


def split_shards(specs: list[Spec], shards: int) -> list[list[Spec]]:
    """Cut the file-order list right after the tensor that crosses each cut; the first shard is half the size
    of the others, so that with as many shards as layers the cuts fall inside layers, not between them.

    Expert weights carry nearly all the bytes, so a cut falls inside a layer's experts and between a weight
    and its scale: the cases a converter must handle across shards in the real checkpoint.
    """
    total = sum(spec_bytes(t) for t in specs)
    out: list[list[Spec]] = [[]]
    done = 0
    for spec in specs:
        out[-1].append(spec)
        done += spec_bytes(spec)
        if len(out) < shards and done >= total * (len(out) - 0.5) / (shards - 0.5):
            out.append([])
    return [group for group in out if group]


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _piece(shape: tuple[int, ...]) -> tuple[int, ...]:
    """What one pool slice fills: a whole tensor, or one expert of a 3-D expert tensor."""
    return shape[1:] if len(shape) == 3 else shape


def write_checkpoint(src: Path, specs: list[Spec], shards: int, config: dict) -> None:
    """Write ``specs`` one shard at a time, then ``config.json`` and the index."""
    import torch
    from safetensors.torch import save_file

    groups = split_shards(specs, shards)
    gen = torch.Generator().manual_seed(0)
    pool_n = max(32 << 20, max(math.prod(_piece(t[1])) for t in specs) + (1 << 20))
    pool = torch.randn(pool_n, generator=gen)
    pool_scale = float(pool.abs().amax()) / FP8_MAX
    q_pool = (pool / pool_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    bf_pool = (pool * 0.02).to(torch.bfloat16)
    del pool

    def sliced(p: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        piece = _piece(shape)
        n = math.prod(piece)
        out = torch.empty(shape, dtype=p.dtype)  # a copy: save_file refuses tensors that share storage
        for row in out.view(-1, *piece):
            o = int(torch.randint(0, pool_n - n, (1,), generator=gen))
            row.copy_(p[o : o + n].view(piece))
        return out

    def make(shape: tuple[int, ...], kind: str) -> torch.Tensor:
        if kind == "fp8":
            return sliced(q_pool, shape)
        if kind in ("fp4", "fp4-u8"):  # any byte is two valid e2m1 codes (stored int8, or uint8)
            codes = torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
            return codes if kind == "fp4" else codes.view(torch.uint8)
        if kind in ("e8m0", "e8m0-u8"):  # powers of two around the pool's scale (each a distinct bf16 value)
            centre = 127 + round(math.log2(pool_scale))
            exps = torch.randint(centre - 2, centre + 3, shape, dtype=torch.uint8, generator=gen)
            return exps.view(torch.float8_e8m0fnu) if kind == "e8m0" else exps
        if kind == "scale":
            return torch.empty(shape).uniform_(0.5, 2.0, generator=gen).mul_(pool_scale)
        if kind == "bf16":
            return sliced(bf_pool, shape)
        if kind == "norm":
            return (1.0 + 0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
        return torch.randn(shape, generator=gen) * 0.01  # f32: e_score_correction_bias

    src.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        name = shard_name(i, len(groups))
        tensors = {key: make(shape, kind) for key, shape, kind in group}
        save_file(tensors, str(src / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (src / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = {"metadata": {"total_size": sum(spec_bytes(t) for t in specs)}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
