"""Peak memory and throughput of ``recast convert --to native`` on a synthetic 12-shard Mistral 4 FP8 model.

    python bench/convert_memory.py [--workdir DIR] [--keep] [--device cpu|cuda]

Target (DESIGN.md §6): converting the checkpoint keeps recast's peak RSS at or below
``baseline + 200 MiB + 3 × the largest output shard``, where the baseline is the peak RSS of
``python -c "import torch, safetensors.torch"``. Exit status 0 on PASS, 1 on FAIL, 2 when a step errors.

Every measured thing runs in its own fresh child process and its peak RSS is the ``ru_maxrss`` that
``os.wait4`` returns for that child. This parent process imports neither torch nor numpy (the synthetic
checkpoint is written by a child too): on Linux a vfork'ed child inherits the parent's RSS high-water mark at
exec time, so a large parent would inflate every child's figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from children import StepFailed, measure, recast_cmd, safetensors_sizes

# --------------------------------------------------------------------------------------------- the checkpoint

LAYERS = 12
EXPERTS = 64  # E
HIDDEN = 1024  # H
MOE_INTER = 512  # I  (gate_up is [E, 2I, H], down is [E, H, I])
KV_DIM = 256
VOCAB = 4096
FP8_MAX = 448.0
PIECE = 64 << 20  # I/O floor piece size
POOL = 16 << 20  # normal values drawn once for the synthetic weights
MIB = 1 << 20

CONFIG = {
    "architectures": ["Mistral4ForCausalLM"],
    "model_type": "mistral4",
    "n_routed_experts": EXPERTS,
    "hidden_size": HIDDEN,
    "moe_intermediate_size": MOE_INTER,
    "num_hidden_layers": LAYERS,
    "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": None},
}


def shard_name(i: int) -> str:
    return f"model-{i + 1:05d}-of-{LAYERS:05d}.safetensors"


def generate(src: Path) -> None:
    """Write the checkpoint one shard (one layer) at a time; runs in a child process.

    Drawing and quantizing 1.2 billion fresh normal values takes most of a minute on two cores, so a pool
    of 16 Mi normal values is drawn and quantized once with the scale ``amax / 448``. Every FP8 weight (each
    expert of an expert tensor) is a slice of that quantized pool at a random offset, and its scale is the
    pool's scale times a random factor: random normal values of differing magnitude, quantized with
    ``amax / 448`` scales, per tensor or per expert.
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(POOL, generator=gen)
    pool_scale = pool.abs().amax() / FP8_MAX
    q_pool = (pool / pool_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    del pool

    def factor(*shape: int) -> torch.Tensor:
        return torch.empty(shape).uniform_(0.01, 0.03, generator=gen)

    def fp8(shape: tuple[int, ...], per_expert: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows, n = (shape[0], shape[1] * shape[2]) if len(shape) == 3 else (1, shape[0] * shape[1])
        offsets = torch.randint(0, POOL - n, (rows,), generator=gen).tolist()
        q = torch.stack([q_pool[o : o + n] for o in offsets]).reshape(shape)
        scale = factor(rows, 1, 1) if per_expert else factor().squeeze()
        return q, (scale * pool_scale).float()

    src.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        per_expert = layer % 2 == 1  # alternate per-tensor ([]) and per-expert ([E, 1, 1]) expert scales
        t: dict[str, torch.Tensor] = {}
        for name, shape in (
            ("gate_up_proj", (EXPERTS, 2 * MOE_INTER, HIDDEN)),
            ("down_proj", (EXPERTS, HIDDEN, MOE_INTER)),
        ):
            t[f"{p}.mlp.experts.{name}"], t[f"{p}.mlp.experts.{name}_scale_inv"] = fp8(shape, per_expert)
        for name, shape in (
            ("q_proj", (HIDDEN, HIDDEN)),
            ("k_proj", (KV_DIM, HIDDEN)),
            ("v_proj", (KV_DIM, HIDDEN)),
            ("o_proj", (HIDDEN, HIDDEN)),
        ):
            t[f"{p}.self_attn.{name}.weight"], t[f"{p}.self_attn.{name}.weight_scale_inv"] = fp8(shape, False)
        t[f"{p}.mlp.gate.weight"] = (torch.randn(EXPERTS, HIDDEN, generator=gen) * 0.02).to(torch.bfloat16)
        t[f"{p}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        if layer == 0:
            t["model.embed_tokens.weight"] = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).to(
                torch.bfloat16
            )
        if layer == LAYERS - 1:
            t["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
            t["lm_head.weight"] = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).to(torch.bfloat16)
        save_file(t, str(src / shard_name(layer)), metadata={"format": "pt"})
        for k, v in t.items():
            weight_map[k] = shard_name(layer)
            total += v.numel() * v.element_size()
        del t
    (src / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (src / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------- child workloads


def naive(src: Path, dst: Path, device: str) -> dict:
    """Whole-state-dict conversion, the way one would write it without thinking about memory."""
    import torch
    from safetensors.torch import load_file, save_file

    started = time.monotonic()
    dev = torch.device(device)
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_file(str(src / shard)))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, shard in weight_map.items():
        if key.endswith(("_scale_inv", "activation_scale")):
            continue
        t = state[key]
        if t.dtype == torch.float8_e4m3fn:
            s = state[key + "_scale_inv"]
            t = (t.to(dev).float() * s.to(dev).float()).to(torch.bfloat16)
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            native = "gate_and_up_projs" if key.endswith("gate_up_proj") else "down_projs"
            key = key.rsplit(".", 1)[0] + "." + native
            t = t.transpose(-1, -2).contiguous()
        out.setdefault(shard, {})[key] = t.cpu()
        bias = key.removesuffix("weight") + "e_score_correction_bias"
        if key.endswith("mlp.gate.weight") and bias not in weight_map:
            out[shard][bias] = torch.zeros(EXPERTS, dtype=torch.float32)
    dst.mkdir(parents=True)
    new_map = {}
    for shard, tensors in out.items():
        save_file(tensors, str(dst / shard), metadata={"format": "pt"})
        new_map.update(dict.fromkeys(tensors, shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": new_map}))
    return {"seconds": time.monotonic() - started}


def io_floor(src: Path, dst: Path, out_sizes: list[int]) -> dict:
    """Read every input shard fully and write the same bytes recast wrote, in 64 MiB pieces, fsync'ed."""
    started = time.monotonic()
    buf = bytearray(PIECE)
    view = memoryview(buf)
    read = 0
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                read += n
    dst.mkdir(parents=True)
    written = 0
    for i, size in enumerate(out_sizes):
        with open(dst / f"out-{i:05d}.bin", "wb", buffering=0) as fh:
            left = size
            while left:
                n = min(left, PIECE)
                fh.write(view[:n])
                left -= n
            os.fsync(fh.fileno())
        written += size
    return {"seconds": time.monotonic() - started, "read": read, "written": written}


BASELINE = "import time; t = time.monotonic(); import torch, safetensors.torch; print(time.monotonic() - t)"

# ------------------------------------------------------------------------------------------------ harness


def self_child(mode: str, *args: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--child", mode, *args]


def gb_s(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.3f}" if seconds > 0 else "-"


def run_bench(work: Path, device: str, no_verify_run: bool) -> int:
    src, logs = work / "src", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work} (device {device}); free disk {shutil.disk_usage(work).free / 2**30:.1f} GiB")

    t = time.monotonic()
    if not (src / "model.safetensors.index.json").exists():
        measure(self_child("generate", str(src)), "generate", logs)
        print(f"generated the synthetic checkpoint in {time.monotonic() - t:.1f} s")
    else:
        print("reusing the checkpoint already in the workdir")
    in_bytes = sum(safetensors_sizes(src))
    print(f"input: {len(safetensors_sizes(src))} shards, {in_bytes / 1e9:.3f} GB")

    rows: list[tuple[str, float | None, str, str, int]] = []  # label, seconds, GB/s in, GB/s out, peak RSS

    out, wall, base_rss = measure([sys.executable, "-c", BASELINE], "baseline", logs)
    rows.append(("baseline import", float(out.strip()), "-", "-", base_rss))

    results = {}
    variants: list[tuple[str, list[str]]] = [("recast convert", [])]
    if no_verify_run:
        variants.append(("recast convert --no-verify", ["--no-verify"]))
    out_sizes: list[int] = []
    for label, extra in variants:
        dst = work / "out-recast"
        shutil.rmtree(dst, ignore_errors=True)
        argv = [*recast_cmd(), "convert", str(src), str(dst), "--to", "native", "--device", device, "--json"]
        argv += extra
        out, wall, rss = measure(argv, label.replace(" ", "_"), logs)
        report = json.loads(out)
        summary = report["summary"]
        if extra == [] and not summary["passed"]:
            raise StepFailed(f"{label}: verification did not pass: {summary}")
        sizes = safetensors_sizes(dst)
        if not out_sizes:
            out_sizes = sizes
        secs = report.get("seconds") or wall
        rows.append((label, secs, gb_s(in_bytes, secs), gb_s(sum(sizes), secs), rss))
        results[label] = {
            "seconds": secs,
            "wall": wall,
            "rss": rss,
            "out_bytes": sum(sizes),
            "shards": len(sizes),
            "passed": summary["passed"],
            "verified": summary["verified"],
        }
        shutil.rmtree(dst)
    out_bytes = sum(out_sizes)
    largest = out_sizes[0]
    print(
        f"recast output: {len(out_sizes)} .safetensors files, {out_bytes / 1e9:.3f} GB, "
        f"largest {largest / MIB:.1f} MiB; verification passed: {results['recast convert']['passed']}"
    )

    dst = work / "out-io"
    shutil.rmtree(dst, ignore_errors=True)
    out, _, rss = measure(self_child("io-floor", str(src), str(dst), json.dumps(out_sizes)), "io_floor", logs)
    io = json.loads(out.strip().splitlines()[-1])
    secs = io["seconds"]
    rows.append(("I/O floor", secs, gb_s(io["read"], secs), gb_s(io["written"], secs), rss))
    shutil.rmtree(dst)

    dst = work / "out-naive"
    shutil.rmtree(dst, ignore_errors=True)
    out, wall, naive_rss = measure(self_child("naive", str(src), str(dst), device), "naive", logs)
    nv = json.loads(out.strip().splitlines()[-1])
    naive_out = sum(safetensors_sizes(dst))
    rows.append(
        (
            "naive load_file/save_file",
            nv["seconds"],
            gb_s(in_bytes, nv["seconds"]),
            gb_s(naive_out, nv["seconds"]),
            naive_rss,
        )
    )
    shutil.rmtree(dst)

    print()
    print(f"{'':28}{'seconds':>9}{'GB/s in':>10}{'GB/s out':>10}{'peak RSS MiB':>14}")
    for label, secs, gin, gout, rss in rows:
        print(f"{label:28}{secs:>9.2f}{gin:>10}{gout:>10}{rss / MIB:>14.0f}")
    print()
    budget = base_rss + 200 * MIB + 3 * largest
    recast_rss = results["recast convert"]["rss"]
    worst_rss = max(r["rss"] for r in results.values())
    print(
        f"budget = baseline + 200 MiB + 3 × largest output shard = {base_rss / MIB:.0f} + 200 + 3 × "
        f"{largest / MIB:.1f} = {budget / MIB:.0f} MiB"
    )
    for label, r in results.items():
        print(
            f"measured {label}: {r['seconds']:.1f} s in the engine, {r['wall']:.1f} s wall; "
            f"peak RSS {r['rss'] / MIB:.0f} MiB "
            f"({(r['rss'] - base_rss) / MIB:.0f} MiB above baseline, "
            f"{r['rss'] / budget:.0%} of the budget)"
        )
    print(
        f"memory     recast / naive    = {recast_rss / MIB:.0f} / {naive_rss / MIB:.0f} MiB = "
        f"{recast_rss / naive_rss:.2f}"
    )
    for label, r in results.items():
        print(
            f"throughput {label} / I/O floor = {io['seconds']:.2f} s / {r['seconds']:.2f} s = "
            f"{io['seconds'] / r['seconds']:.2f} (of the floor's GB/s)"
        )
    verified = results["recast convert"]["seconds"]
    fast = verified <= 0.8 * nv["seconds"]
    print(
        f"speed      recast convert (verified) / naive (unverified) = {verified:.2f} s / {nv['seconds']:.2f} s"
        f" = {verified / nv['seconds']:.2f} (target <= 0.80: {'PASS' if fast else 'FAIL'})"
    )
    ok = worst_rss <= budget
    print(
        f"memory target: {'PASS' if ok else 'FAIL'} (peak {worst_rss / MIB:.0f} MiB "
        f"{'<=' if ok else '>'} budget {budget / MIB:.0f} MiB)"
    )
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if parent >= base_rss:
        print(
            f"WARNING: this harness's own peak RSS ({parent / MIB:.0f} MiB) may have inflated its children's"
        )
    return 0 if ok else 1


def child_main(mode: str, args: list[str]) -> None:
    if mode == "generate":
        generate(Path(args[0]))
    elif mode == "naive":
        print(json.dumps(naive(Path(args[0]), Path(args[1]), args[2])))
    elif mode == "io-floor":
        print(json.dumps(io_floor(Path(args[0]), Path(args[1]), json.loads(args[2]))))
    else:
        raise SystemExit(f"unknown child mode {mode!r}")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, help="where the checkpoint and outputs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (and the generated checkpoint)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--skip-no-verify", action="store_true", help="skip the extra --no-verify run")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="recast-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run_bench(work.resolve(), args.device, not args.skip_no_verify)
    except StepFailed as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept {work}")
        elif args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for name in ("src", "out-recast", "out-io", "out-naive", "logs"):
                shutil.rmtree(work / name, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
