"""Peak memory of ``recast convert`` on the largest mixture-of-experts shapes, to native and back.

    PYTHONPATH=$PWD python bench/moe_memory.py [--families kimi-k2,deepseek-v3,qwen3.5-moe,qwen3-vl-moe]
        [--layers 2] [--experts N] [--workdir DIR] [--keep]

Issue 12, item 3: expert tensors must stream per expert within bounded memory, whatever the expert count.
For each family this writes a synthetic checkpoint with the family's real routed-expert count (Kimi K2's
384, DeepSeek-V3's 256, Qwen3.5-397B's 512, Qwen3-VL-235B's 128) but small hidden and expert widths and
two layers, so that one layer's stacked ``[E, ...]`` native expert tensor is hundreds of MiB while the run
takes minutes on two cores. Then, each in its own fresh child process:

    plan    the engine's own plan of both conversions, from headers: lanes, largest work unit, write-behind
    recast  recast convert SRC NATIVE --to native --json (verification on)
    back    recast convert NATIVE BACK --to hf --json (verification on); BACK must equal SRC byte for byte
    naive   load every shard into one dict, dequantize every FP8 weight (fp32, then bf16), save_file

Budget, per direction, from the plan's constants (independent of the expert count and of the shard size):

    baseline + 200 MiB + lanes x (WRITE_BEHIND + (READ_AHEAD_UNITS + 4) x 4 x U)
    U = max(STEP_BYTES, one expert's [H, 2I] slice in bf16)

that is, per shard lane: the bytes queued for the writer, plus the units read ahead, the one computing
and its verification, each at most fp32-sized. Every unit of the plan must read at most U, and U must be at
most a quarter of one stacked tensor: a plan that takes whole stacked tensors as units fails (with
``STEP_BYTES`` raised to 1 TiB the 384-expert Kimi K2 conversion peaked at 6.3 GiB). ``baseline`` is the
peak RSS of ``import torch, safetensors.torch``. Converting one stacked expert tensor whole, as a
per-tensor conversion would, needs more than the budget at these shapes (the script says so per family).

Exit status 0 when every conversion is within its budget, every unit within U and the way back is
byte-identical, 1 otherwise, 2 when a step errors. This parent imports neither torch nor numpy (see
children.py); the checkpoints are written by children too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from children import StepFailed, measure, recast_cmd, safetensors_sizes, same_files
from gpu_scale import BLOCK, Shape, tensor_specs
from synthetic import Spec, write_checkpoint

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]  # the repository root: ``worker`` must import from here
FIXED = 200 * MIB  # interpreter, torch's allocator, the plan and the report: as in convert_memory.py
BASELINE = "import torch, safetensors.torch"


@dataclass(frozen=True)
class Family:
    """A synthetic checkpoint in one family's published layout.

    ``layout``: ``split`` (per-expert 2-D ``mlp.experts.{e}.{gate,up,down}_proj.weight``, block FP8, stacked
    into ``[E, H, 2I]`` / ``[E, I, H]`` natively), ``hf-aggregated`` (``gate_up_proj`` ``[E, 2I, H]`` in bf16,
    transposed natively) or ``native-aggregated`` (``gate_up_proj`` ``[E, H, 2I]``, block FP8 with 3-D
    scales ``[E, H/128, 2I/128]``, renamed only).
    """

    name: str
    layout: str
    experts: int
    hidden: int
    inter: int
    layers: int
    model_type: str
    architecture: str
    text_type: str | None = None

    def specs(self) -> list[Spec]:
        if self.layout == "split":
            return tensor_specs(self.split_shape())
        fp8 = self.layout == "native-aggregated"
        e, h, i = self.experts, self.hidden, self.inter
        p0 = "model.language_model."
        specs: list[Spec] = [(f"{p0}embed_tokens.weight", (4096, h), "bf16")]

        def weight(key: str, shape: tuple[int, ...]) -> None:
            specs.append((key, shape, "fp8" if fp8 else "bf16"))
            if fp8:
                blocks = (*shape[:-2], math.ceil(shape[-2] / BLOCK), math.ceil(shape[-1] / BLOCK))
                specs.append((key + "_scale_inv", blocks, "scale"))

        for layer in range(self.layers):
            p = f"{p0}layers.{layer}."
            specs.append((p + "input_layernorm.weight", (h,), "norm"))
            up, down = ((e, h, 2 * i), (e, i, h)) if fp8 else ((e, 2 * i, h), (e, h, i))
            weight(p + "mlp.experts.gate_up_proj", up)
            weight(p + "mlp.experts.down_proj", down)
            specs.append((p + "mlp.gate.weight", (e, h), "bf16"))
            specs.append((p + "post_attention_layernorm.weight", (h,), "norm"))
            for proj, rows in (("q", h), ("k", h // 4), ("v", h // 4)):
                weight(f"{p}self_attn.{proj}_proj.weight", (rows, h))
            weight(p + "self_attn.o_proj.weight", (h, h))
        specs.append((f"{p0}norm.weight", (h,), "norm"))
        specs.append(("lm_head.weight", (4096, h), "bf16"))
        return specs

    def split_shape(self) -> Shape:
        return Shape(
            self.layers, self.experts, self.inter, self.hidden, 4096, 2 * self.layers, self.model_type
        )

    def config(self) -> dict:
        if self.layout == "split":
            return {**self.split_shape().config(), "architectures": [self.architecture]}
        text = {
            "model_type": self.text_type,
            "hidden_size": self.hidden,
            "moe_intermediate_size": self.inter,
            "num_experts": self.experts,
            "num_experts_per_tok": 8,
            "num_hidden_layers": self.layers,
            "vocab_size": 4096,
        }
        config = {"architectures": [self.architecture], "model_type": self.model_type, "text_config": text}
        if self.layout == "native-aggregated":
            config["quantization_config"] = {
                "quant_method": "fp8",
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "weight_block_size": [BLOCK, BLOCK],
            }
        return config

    def stacked_bytes(self) -> int:
        """One layer's native ``gate_and_up_projs`` ``[E, H, 2I]`` in bf16: what must never be held whole."""
        return self.experts * self.hidden * 2 * self.inter * 2

    def slice_bytes(self) -> int:
        """One expert's slice of that tensor, ``[H, 2I]`` in bf16: no source or native expert row is bigger."""
        return self.hidden * 2 * self.inter * 2

    def whole_bytes(self) -> int:
        """What converting that tensor in one piece holds: its source bytes, the fp32 value an FP8 source is
        dequantized into, and the bf16 result. The shapes are chosen so that this alone exceeds the budget."""
        n = self.experts * self.hidden * 2 * self.inter
        return n * (1 + 4 + 2) if self.layout != "hf-aggregated" else n * (2 + 2)


FAMILIES = {
    f.name: f
    for f in (
        Family("kimi-k2", "split", 384, 1024, 512, 2, "kimi_k2", "DeepseekV3ForCausalLM"),
        Family("deepseek-v3", "split", 256, 1024, 512, 2, "deepseek_v3", "DeepseekV3ForCausalLM"),
        Family(
            "qwen3.5-moe",
            "hf-aggregated",
            512,
            1024,
            512,
            2,
            "qwen3_5_moe",
            "Qwen3_5MoeForConditionalGeneration",
            "qwen3_5_moe_text",
        ),
        Family(
            "qwen3-vl-moe",
            "native-aggregated",
            128,
            2048,
            768,
            2,
            "qwen3_vl_moe",
            "Qwen3VLMoeForConditionalGeneration",
            "qwen3_vl_moe_text",
        ),
    )
}


# ---------------------------------------------------------------------------------------- child workloads


def plan(src: Path, to: str) -> dict:
    """The engine's plan of converting ``src``: its lanes, largest work unit and largest output tensor, and
    the peak memory ``recast inspect`` predicts."""
    sys.path.insert(0, str(ROOT))
    from worker.engine.convert import READ_AHEAD_UNITS, plan_conversion
    from worker.engine.inspect import inspect
    from worker.engine.options import STEP_BYTES, Options
    from worker.engine.pipeline import lanes
    from worker.engine.shard_stream import WRITE_BEHIND

    conv = plan_conversion(src, Options(to=to, device="cpu"))
    units = [u.bytes_in for name in conv.shard_names() for u in conv.direction.units(name, None)]
    tensors = [s.end - s.start for name in conv.shard_names() for s in conv.layout.slots(name).values()]
    return {
        "adapter": conv.adapter.name,
        "lanes": lanes("cpu"),
        "step_bytes": STEP_BYTES["cpu"],
        "read_ahead_units": READ_AHEAD_UNITS,
        "write_behind": WRITE_BEHIND,
        "units": len(units),
        "largest_unit": max(units),
        "largest_tensor": max(tensors),
        "inspect_peak": inspect(src)["conversion"]["peak_host_memory_bytes"],
    }


def naive(src: Path, dst: Path) -> dict:
    """Load every shard into one dict, dequantize each FP8 weight whole (fp32, then bf16), save per shard."""
    import torch
    from safetensors.torch import load_file, save_file

    weight_map: dict[str, str] = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_file(str(src / shard)))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, shard in weight_map.items():
        if key.endswith("_scale_inv"):
            continue
        t = state[key]
        if t.dtype == torch.float8_e4m3fn:
            s = state[key + "_scale_inv"]
            s = s.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[..., : t.shape[-2], : t.shape[-1]]
            t = (t.float() * s).to(torch.bfloat16)
        out.setdefault(shard, {})[key] = t
    dst.mkdir(parents=True)
    for shard, tensors in out.items():
        save_file(tensors, str(dst / shard), metadata={"format": "pt"})
    return {"bytes": sum(t.numel() * t.element_size() for d in out.values() for t in d.values())}


def child_main(mode: str, args: list[str]) -> None:
    if mode == "generate":
        family = Family(**json.loads(args[1]))
        write_checkpoint(Path(args[0]), family.specs(), 2 * family.layers, family.config())
    elif mode == "plan":
        print(json.dumps(plan(Path(args[0]), args[1])))
    elif mode == "naive":
        print(json.dumps(naive(Path(args[0]), Path(args[1]))))
    elif mode == "compare":
        print(json.dumps(same_files(Path(args[0]), Path(args[1]))))
    else:
        raise SystemExit(f"unknown child mode {mode!r}")


# ------------------------------------------------------------------------------------------------ harness


def self_child(mode: str, *args: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--child", mode, *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def unit_bound(p: dict, f: Family) -> int:
    """The most a work unit may read when experts stream: a step's bytes, or one expert slice if bigger."""
    return max(p["step_bytes"], f.slice_bytes())


def budget_of(p: dict, f: Family, base_rss: int) -> int:
    """What the plan's lanes, read-ahead and write-behind allow, with units of at most ``unit_bound``."""
    per_lane = p["write_behind"] + (p["read_ahead_units"] + 4) * 4 * unit_bound(p, f)
    return base_rss + FIXED + p["lanes"] * per_lane


@dataclass
class Run:
    """One conversion of a family's checkpoint, in a fresh child."""

    direction: str
    seconds: float
    rss: int
    budget: int
    plan: dict


@dataclass
class Result:
    family: Family
    in_bytes: int
    naive_rss: int
    runs: list[Run]
    identical: bool


HEADER = (
    f"{'family':14}{'experts':>8}{'GB in':>7}{'stack MiB':>10}{'direction':>12}{'s':>7}{'peak MiB':>10}"
    f"{'budget MiB':>11}{'inspect MiB':>12}{'naive MiB':>10}{'peak/naive':>11}  verdict"
)


def rows_of(r: Result) -> list[str]:
    f = r.family
    return [
        f"{f.name:14}{f.experts:>8}{r.in_bytes / 1e9:>7.2f}{f.stacked_bytes() / MIB:>10.0f}{run.direction:>12}"
        f"{run.seconds:>7.1f}{run.rss / MIB:>10.0f}{run.budget / MIB:>11.0f}"
        f"{run.plan['inspect_peak'] / MIB:>12.0f}{r.naive_rss / MIB:>10.0f}{run.rss / r.naive_rss:>11.2f}"
        f"  {'PASS' if run.rss <= run.budget else 'FAIL'}"
        for run in r.runs
    ]


def run_family(f: Family, work: Path, logs: Path, base_rss: int) -> Result:
    env = child_env()
    src, native, back = work / f"{f.name}-src", work / f"{f.name}-native", work / f"{f.name}-back"
    stamp = src / "bench-shape.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != asdict(f):
        shutil.rmtree(src, ignore_errors=True)
        _, wall, _ = measure(
            self_child("generate", str(src), json.dumps(asdict(f))), f"{f.name}-generate", logs
        )
        stamp.write_text(json.dumps(asdict(f)))
        print(f"{f.name}: generated in {wall:.1f} s", flush=True)
    in_bytes = sum(safetensors_sizes(src))
    print(
        f"{f.name}: {f.experts} experts, {in_bytes / 1e9:.2f} GB in {len(safetensors_sizes(src))} shards; "
        f"one stacked gate_and_up_projs {f.stacked_bytes() / MIB:.0f} MiB bf16",
        flush=True,
    )
    runs = []
    for direction, a, b, to in (("to native", src, native, "native"), ("back to hf", native, back, "hf")):
        shutil.rmtree(b, ignore_errors=True)
        p = last_json(measure(self_child("plan", str(a), to), f"{f.name}-plan-{to}", logs, env)[0])
        argv = [*recast_cmd(), "convert", str(a), str(b), "--to", to, "--device", "cpu", "--json"]
        out, wall, rss = measure(argv, f"{f.name}-{to}", logs, env)
        report = json.loads(out)
        if not report["summary"]["passed"]:
            raise StepFailed(f"{f.name} {direction}: verification did not pass: {report['summary']}")
        runs.append(Run(direction, report.get("seconds") or wall, rss, budget_of(p, f, base_rss), p))
    same = last_json(measure(self_child("compare", str(src), str(back)), f"{f.name}-compare", logs)[0])
    shutil.rmtree(native)
    shutil.rmtree(back)
    dst = work / f"{f.name}-naive"
    shutil.rmtree(dst, ignore_errors=True)
    _, _, naive_rss = measure(self_child("naive", str(src), str(dst)), f"{f.name}-naive", logs)
    shutil.rmtree(dst)
    result = Result(f, in_bytes, naive_rss, runs, same["identical"])
    for line in rows_of(result):
        print(line, flush=True)
    print(
        f"{f.name}: the way back is {'' if same['identical'] else 'NOT '}byte-identical to the source "
        f"{same.get('detail', '')}",
        flush=True,
    )
    return result


def report(results: list[Result], base_rss: int) -> int:
    print()
    print(f"baseline ({BASELINE}): peak RSS {base_rss / MIB:.0f} MiB")
    print(HEADER)
    for r in results:
        print("\n".join(rows_of(r)))
    print()
    failed = False
    for r in results:
        p, f = r.runs[0].plan, r.family
        peak = max(run.rss for run in r.runs)
        whole = base_rss + f.whole_bytes()
        catches = whole > max(run.budget for run in r.runs)
        bound = max(unit_bound(run.plan, f) for run in r.runs)
        per_expert = all(run.plan["largest_unit"] <= unit_bound(run.plan, f) for run in r.runs)
        per_expert &= bound <= f.stacked_bytes() // 4
        failed |= not r.identical or not per_expert or any(run.rss > run.budget for run in r.runs)
        largest = max(run.plan["largest_unit"] for run in r.runs)
        print(
            f"{f.name}: plan ({p['adapter']}) {p['lanes']} lanes, {p['units']} units to native; largest unit "
            f"{largest / MIB:.1f} MiB in, per-expert bound {bound / MIB:.1f} MiB (at most a quarter of a stacked "
            f"tensor): {'PASS' if per_expert else 'FAIL'}; largest output tensor {p['largest_tensor'] / MIB:.0f} MiB; "
            f"peak above baseline {(peak - base_rss) / MIB:.0f} MiB = "
            f"{(peak - base_rss) / f.stacked_bytes():.2f} x one stacked expert tensor; converting that tensor "
            f"whole would need about {whole / MIB:.0f} MiB "
            f"({'over the budget: the check catches it' if catches else 'NOT over the budget'}); "
            f"way back byte-identical: {r.identical}"
        )
    p = results[0].runs[0].plan
    print(
        f"budget = baseline + {FIXED // MIB} MiB + lanes x (write-behind {p['write_behind'] // MIB} MiB + "
        f"({p['read_ahead_units']} read ahead + 4) x 4 x per-expert bound); per-expert bound = max(step "
        f"{p['step_bytes'] / MIB:.0f} MiB, one expert's [H, 2I] bf16 slice); inspect = recast inspect's "
        "peak_host_memory_bytes"
    )
    print(f"memory: {'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}"
    )
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, help="override every family's expert count (to compare scales)")
    ap.add_argument("--workdir", type=Path, help="where checkpoints and outputs go (default: a temp dir)")
    ap.add_argument(
        "--keep", action="store_true", help="keep the work dir (a later run reuses the checkpoints)"
    )
    args = ap.parse_args()
    names = [n for n in args.families.split(",") if n]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="recast-moe-", dir="/tmp"))).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(
        f"workdir {work}; free disk {shutil.disk_usage(work).free / 2**30:.1f} GiB; {os.cpu_count()} cores",
        flush=True,
    )
    try:
        _, _, base_rss = measure([sys.executable, "-c", BASELINE], "baseline", logs)
        results = []
        for name in names:
            f = FAMILIES[name]
            changes = {"layers": args.layers} | ({"experts": args.experts} if args.experts else {})
            results.append(run_family(Family(**(asdict(f) | changes)), work, logs, base_rss))
        return report(results, base_rss)
    except StepFailed as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept {work}")
        elif args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for name in [
                *(f"{n}-{part}" for n in names for part in ("src", "native", "back", "naive")),
                "logs",
            ]:
                shutil.rmtree(work / name, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
