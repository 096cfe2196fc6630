"""GPU-scale throughput of ``recast convert`` on a DeepSeek-V3-shaped block-FP8 checkpoint, beside the I/O floor.

    PYTHONPATH=. python bench/gpu_scale.py [--workdir DIR] [--keep] [--device auto|cpu|cuda]
        [--layers 6] [--experts 32] [--shards 6] [--inter 2048] [--hidden 7168] [--vocab 4096]
        [--repeat N] [--rows floor,overlap,naive,recast,recast-nv,back,back-nv] [--no-drop-caches]
        [--family deepseek-v3|deepseek-v4|kimi-k3]

Why: converting a checkpoint is disk-bound. On the H200 the disk reads the input and writes the bf16 output
in about 19 s (8.5 GB in, 17 GB out), while recast took 3-5x that (PITFALLS.md, "Where the time goes").
The question this script answers in one run, side by side and from a cold page cache: how far is each way of
converting from what the disk allows? Targets: ``recast convert`` at most 1.15x the serial I/O floor with
verification, 1.05x without.

What: it writes a synthetic DeepSeek-V3-shaped checkpoint (``DeepseekV3ForCausalLM``, per-expert 2-D
``gate_proj``/``up_proj`` ``[I, H]`` and ``down_proj`` ``[H, I]`` in float8_e4m3fn with 128x128 block
``weight_scale_inv``, MLA attention projections in FP8 with block scales, a bf16 router, an fp32
``e_score_correction_bias``, bf16 norms, embeddings and ``lm_head``), cut into shards so that a layer's
experts, and a weight and its scale, straddle shard boundaries as in the real checkpoint. The default,
6 layers x 32 experts of 2048 x 7168 in 6 shards, is 8.73 GB of FP8 in and 17.34 GB of bf16 out.
``--family deepseek-v4`` writes DeepSeek-V4-Flash's release layout instead (``layers.{i}.ffn.experts.{e}.w1``
in FP4: int8 ``[out, in/2]`` with an e8m0 ``.scale`` per 32 columns; attention and shared experts e4m3
with e8m0 128x128 ``.scale``), whose bf16 output is four times its experts' bytes (no naive row).
``--family kimi-k3`` writes Kimi K3's: the text model under ``language_model.``, its routed experts in
compressed-tensors' MXFP4 (uint8 ``block_sparse_moe.experts.{e}.w1.weight_packed`` ``[out, in/2]`` beside a
uint8 ``weight_scale`` per 32 columns) working in a latent width of H/2, the rest bf16 (no naive row). Then each
row runs in its own fresh child process, with the page cache dropped before it when this process may:

    floor      read every input byte, then write as many bytes as the bf16 output has, fsync'ed
    overlap    the same bytes, read by one thread while two threads write two files at a time
    naive      per shard: load_file, dequantize every FP8 weight in fp32 and cast to bf16, save_file
               (what DeepSeek's inference/fp8_cast_bf16.py does; scales are found through the index)
    recast     recast convert SRC NATIVE --to native --device D --json  (verification on)
    recast-nv  the same with --no-verify
    back       recast convert NATIVE BACK --to hf --quantize keep --device D --json; the shards must be
               byte-identical to the source (checked in a child, outside the timing)
    back-nv    the same with --no-verify (not in the default rows)

How it is measured: seconds are the child's wall time, interpreter start and imports included, plus an
``os.sync()`` after it exits (every row writes). Peak RSS is the child's ``ru_maxrss`` from ``os.wait4``.
Peak GPU memory is ``torch.cuda.max_memory_allocated()`` / ``max_memory_reserved()`` of the child, which
reports it in a small JSON file after its work (recast runs through ``worker.cli.main`` in a thin wrapper,
the same code path as ``python -m worker.cli``). This parent imports neither torch nor numpy: on Linux a
vfork'ed child starts from its parent's RSS high-water mark, so a large parent would inflate every figure.

Exit status: 0 when every step ran (the targets are reported, not enforced), 1 when the way back is not
byte-identical to the source, 2 when a step errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from children import StepFailed, measure, same_files
from synthetic import Spec, write_checkpoint

BLOCK = 128  # weight_block_size [128, 128]
HEADS = 8  # MLA attention heads (DeepSeek-V3 has 128; 8 keeps attention a small share, as in the real model)
ROPE, NOPE, V_HEAD = 64, 128, 128  # qk_rope_head_dim, qk_nope_head_dim, v_head_dim
V4_HEAD = 512  # DeepSeek-V4's head_dim
PIECE = 64 << 20  # I/O floor piece size
WRITERS = 2  # writer threads of the overlapped floor
GIB = 1 << 30
ROOT = Path(__file__).resolve().parents[1]  # the repository root: ``worker`` must import from here

ROWS: dict[str, str] = {
    "floor": "I/O floor, serial",
    "overlap": "I/O floor, overlapped",
    "naive": "naive (fp8_cast_bf16 style)",
    "recast": "recast convert",
    "recast-nv": "recast convert --no-verify",
    "back": "back --to hf",
    "back-nv": "back --to hf --no-verify",
}
DEFAULT_ROWS = ("floor", "overlap", "naive", "recast", "recast-nv", "back")
TARGETS = {"recast": 1.15, "recast-nv": 1.05}
WARM = "page cache NOT dropped: figures are warm-cache upper bounds"


# --------------------------------------------------------------------------------------------- the checkpoint


@dataclass(frozen=True)
class Shape:
    layers: int
    experts: int
    inter: int  # I, moe_intermediate_size
    hidden: int  # H
    vocab: int
    shards: int
    model_type: str = "deepseek_v3"  # kimi_k2 for Kimi K2, the same architecture
    family: str = "deepseek-v3"  # or deepseek-v4 / kimi-k3: their release names and FP4 experts

    @property
    def q_lora(self) -> int:
        return max(16, round(self.hidden * 3 / 14))  # 1536 for H = 7168, as in DeepSeek-V3

    @property
    def kv_lora(self) -> int:
        return max(16, self.hidden // 14)  # 512 for H = 7168

    @property
    def latent(self) -> int:
        return self.hidden // 2  # Kimi K3's routed_expert_hidden_size (3584 for H = 7168)

    @property
    def mla(self) -> dict:
        """The config.json fields DeepSeek-V3's and Kimi K3's share: MLA attention, vocabulary, dtype."""
        return {
            "num_attention_heads": HEADS,
            "q_lora_rank": self.q_lora,
            "kv_lora_rank": self.kv_lora,
            "qk_nope_head_dim": NOPE,
            "qk_rope_head_dim": ROPE,
            "v_head_dim": V_HEAD,
            "vocab_size": self.vocab,
            "torch_dtype": "bfloat16",
        }

    def config(self) -> dict:
        if self.family == "kimi-k3":
            text = {
                "architectures": ["KimiK3ForCausalLM"],
                "model_type": "kimi_linear",
                "hidden_size": self.hidden,
                "moe_intermediate_size": self.inter,
                "routed_expert_hidden_size": self.latent,
                "num_hidden_layers": self.layers,
                "num_experts": self.experts,
                "num_experts_per_token": min(8, self.experts),
                **self.mla,
            }
            weights = {
                "num_bits": 4,
                "type": "float",
                "symmetric": True,
                "strategy": "group",
                "group_size": 32,
            }
            return {
                "architectures": ["KimiK3ForConditionalGeneration"],
                "model_type": "kimi_k3",
                "text_config": text,
                "quantization_config": {
                    "quant_method": "compressed-tensors",
                    "format": "mxfp4-pack-quantized",
                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
                    "ignore": ["lm_head"],
                },
            }
        if self.family == "deepseek-v4":
            return {
                "architectures": ["DeepseekV4ForCausalLM"],
                "model_type": "deepseek_v4",
                "hidden_size": self.hidden,
                "moe_intermediate_size": self.inter,
                "num_hidden_layers": self.layers,
                "n_routed_experts": self.experts,
                "n_shared_experts": 1,
                "num_experts_per_tok": min(6, self.experts),
                "num_attention_heads": HEADS,
                "head_dim": V4_HEAD,
                "q_lora_rank": self.q_lora,
                "num_nextn_predict_layers": 0,
                "vocab_size": self.vocab,
                "torch_dtype": "bfloat16",
                "expert_dtype": "fp4",
                "quantization_config": {
                    "quant_method": "fp8",
                    "activation_scheme": "dynamic",
                    "fmt": "e4m3",
                    "scale_fmt": "ue8m0",
                    "weight_block_size": [BLOCK, BLOCK],
                },
            }
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": self.model_type,
            "hidden_size": self.hidden,
            "intermediate_size": 9 * self.inter,
            "moe_intermediate_size": self.inter,
            "num_hidden_layers": self.layers,
            "first_k_dense_replace": 0,
            "n_routed_experts": self.experts,
            "n_shared_experts": 1,
            "num_experts_per_tok": min(8, self.experts),
            "n_group": 1,
            "topk_group": 1,
            **self.mla,
            "num_key_value_heads": HEADS,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "quantization_config": {
                "quant_method": "fp8",
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "weight_block_size": [BLOCK, BLOCK],
            },
        }


def blocks(shape: tuple[int, int]) -> tuple[int, int]:
    """The 128x128 scale grid of a 2-D weight."""
    return math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)


def mla_specs(s: Shape, p: str, specs: list[Spec], weight) -> None:
    """One MLA attention block's tensors under ``p``, in file order; ``weight(key, shape)`` adds a matrix."""
    h = s.hidden
    specs.append((f"{p}kv_a_layernorm.weight", (s.kv_lora,), "norm"))
    weight(f"{p}kv_a_proj_with_mqa.weight", (s.kv_lora + ROPE, h))
    weight(f"{p}kv_b_proj.weight", (HEADS * (NOPE + V_HEAD), s.kv_lora))
    weight(f"{p}o_proj.weight", (h, HEADS * V_HEAD))
    specs.append((f"{p}q_a_layernorm.weight", (s.q_lora,), "norm"))
    weight(f"{p}q_a_proj.weight", (s.q_lora, h))
    weight(f"{p}q_b_proj.weight", (HEADS * (NOPE + ROPE), s.q_lora))


def tensor_specs(s: Shape) -> list[Spec]:
    """Every tensor of the checkpoint in file order, each FP8 weight followed by its block scale."""
    h, i = s.hidden, s.inter
    specs: list[Spec] = [("model.embed_tokens.weight", (s.vocab, h), "bf16")]

    def fp8(key: str, shape: tuple[int, int]) -> None:
        specs.append((key, shape, "fp8"))
        specs.append((key + "_scale_inv", blocks(shape), "scale"))

    for layer in range(s.layers):
        p = f"model.layers.{layer}"
        specs.append((f"{p}.input_layernorm.weight", (h,), "norm"))
        for e in range(s.experts):
            fp8(f"{p}.mlp.experts.{e}.down_proj.weight", (h, i))
            fp8(f"{p}.mlp.experts.{e}.gate_proj.weight", (i, h))
            fp8(f"{p}.mlp.experts.{e}.up_proj.weight", (i, h))
        specs.append((f"{p}.mlp.gate.e_score_correction_bias", (s.experts,), "f32"))
        specs.append((f"{p}.mlp.gate.weight", (s.experts, h), "bf16"))
        specs.append((f"{p}.post_attention_layernorm.weight", (h,), "norm"))
        mla_specs(s, f"{p}.self_attn.", specs, fp8)
    specs.append(("model.norm.weight", (h,), "norm"))
    specs.append(("lm_head.weight", (s.vocab, h), "bf16"))
    return specs


def v4_tensor_specs(s: Shape) -> list[Spec]:
    """DeepSeek-V4-Flash's release layout in file order: routed experts FP4 (int8 ``[out, in/2]`` beside an
    e8m0 ``.scale`` per 32 columns), the attention and shared experts e4m3 with e8m0 128x128 ``.scale``."""
    h, i = s.hidden, s.inter
    specs: list[Spec] = [("embed.weight", (s.vocab, h), "bf16")]

    def fp8(key: str, shape: tuple[int, int]) -> None:
        specs.append((f"{key}.weight", shape, "fp8"))
        specs.append((f"{key}.scale", blocks(shape), "e8m0"))

    def fp4(key: str, shape: tuple[int, int]) -> None:
        specs.append((f"{key}.weight", (shape[0], shape[1] // 2), "fp4"))
        specs.append((f"{key}.scale", (shape[0], shape[1] // 32), "e8m0"))

    for layer in range(s.layers):
        p = f"layers.{layer}"
        specs.append((f"{p}.attn_norm.weight", (h,), "norm"))
        specs.append((f"{p}.attn.attn_sink", (HEADS,), "f32"))
        specs.append((f"{p}.attn.norm.weight", (V4_HEAD,), "norm"))
        specs.append((f"{p}.attn.q_norm.weight", (s.q_lora,), "norm"))
        fp8(f"{p}.attn.wkv", (V4_HEAD, h))
        fp8(f"{p}.attn.wo_a", (s.q_lora, HEADS * V4_HEAD))
        fp8(f"{p}.attn.wo_b", (h, s.q_lora))
        fp8(f"{p}.attn.wq_a", (s.q_lora, h))
        fp8(f"{p}.attn.wq_b", (HEADS * V4_HEAD, s.q_lora))
        for e in range(s.experts):
            fp4(f"{p}.ffn.experts.{e}.w1", (i, h))
            fp4(f"{p}.ffn.experts.{e}.w2", (h, i))
            fp4(f"{p}.ffn.experts.{e}.w3", (i, h))
        specs.append((f"{p}.ffn.gate.bias", (s.experts,), "f32"))
        specs.append((f"{p}.ffn.gate.weight", (s.experts, h), "bf16"))
        fp8(f"{p}.ffn.shared_experts.w1", (i, h))
        fp8(f"{p}.ffn.shared_experts.w2", (h, i))
        fp8(f"{p}.ffn.shared_experts.w3", (i, h))
        specs.append((f"{p}.ffn_norm.weight", (h,), "norm"))
    specs.append(("norm.weight", (h,), "norm"))
    specs.append(("head.weight", (s.vocab, h), "bf16"))
    return specs


def k3_tensor_specs(s: Shape) -> list[Spec]:
    """Kimi K3's release layout in file order (MLA layers, every one with experts): the routed experts MXFP4
    in compressed-tensors' spelling, uint8 ``weight_packed`` ``[out, in/2]`` beside a uint8 e8m0
    ``weight_scale`` per 32 columns, in the latent width; the latent projections, attention and shared
    expert bf16."""
    h, i, lat = s.hidden, s.inter, s.latent
    specs: list[Spec] = [("language_model.model.embed_tokens.weight", (s.vocab, h), "bf16")]

    def fp4(key: str, shape: tuple[int, int]) -> None:
        specs.append((f"{key}.weight_packed", (shape[0], shape[1] // 2), "fp4-u8"))
        specs.append((f"{key}.weight_scale", (shape[0], shape[1] // 32), "e8m0-u8"))

    for layer in range(s.layers):
        p = f"language_model.model.layers.{layer}"
        moe = f"{p}.block_sparse_moe"
        for e in range(s.experts):
            fp4(f"{moe}.experts.{e}.w1", (i, lat))
            fp4(f"{moe}.experts.{e}.w2", (lat, i))
            fp4(f"{moe}.experts.{e}.w3", (i, lat))
        specs.append((f"{moe}.gate.e_score_correction_bias", (s.experts,), "f32"))
        specs.append((f"{moe}.gate.weight", (s.experts, h), "bf16"))
        specs.append((f"{moe}.routed_expert_down_proj.weight", (lat, h), "bf16"))
        specs.append((f"{moe}.routed_expert_norm.weight", (lat,), "norm"))
        specs.append((f"{moe}.routed_expert_up_proj.weight", (h, lat), "bf16"))
        specs.append((f"{moe}.shared_experts.down_proj.weight", (h, i), "bf16"))
        specs.append((f"{moe}.shared_experts.gate_proj.weight", (i, h), "bf16"))
        specs.append((f"{moe}.shared_experts.up_proj.weight", (i, h), "bf16"))
        specs.append((f"{p}.input_layernorm.weight", (h,), "norm"))
        specs.append((f"{p}.post_attention_layernorm.weight", (h,), "norm"))
        mla_specs(s, f"{p}.self_attn.", specs, lambda key, shape: specs.append((key, shape, "bf16")))
    specs.append(("language_model.model.norm.weight", (h,), "norm"))
    specs.append(("language_model.lm_head.weight", (s.vocab, h), "bf16"))
    return specs


_SPECS = {"deepseek-v3": tensor_specs, "deepseek-v4": v4_tensor_specs, "kimi-k3": k3_tensor_specs}


def generate(src: Path, s: Shape) -> None:
    """Write the checkpoint one shard at a time (``synthetic.write_checkpoint``); runs in a child process."""
    specs = _SPECS[s.family](s)
    write_checkpoint(src, specs, s.shards, s.config())


# ---------------------------------------------------------------------------------------- child workloads


def gpu_peak() -> dict:
    """This process's peak CUDA memory, if it used CUDA at all (checked without initialising it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {}
    return {"gpu_alloc": torch.cuda.max_memory_allocated(), "gpu_reserved": torch.cuda.max_memory_reserved()}


def startup(device: str) -> dict:
    """What every torch child pays before its work: ``import torch`` and, on CUDA, the context."""
    started = time.monotonic()
    import torch

    imported = time.monotonic()
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    name = None
    if cuda:
        torch.cuda.init()
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
        name = torch.cuda.get_device_name()
    ready = time.monotonic()
    return {
        "seconds": ready - started,
        "import_s": imported - started,
        "cuda_init_s": ready - imported if cuda else None,
        "device": "cuda" if cuda else "cpu",
        "gpu_name": name,
        "torch": torch.__version__,
        **gpu_peak(),
    }


def pattern() -> memoryview:
    return memoryview(bytes(range(256)) * (PIECE // 256))


def write_file(path: Path, size: int, data: memoryview) -> None:
    with open(path, "wb", buffering=0) as fh:
        left = size
        while left:
            left -= fh.write(data[: min(left, PIECE)])
        os.fsync(fh.fileno())


def read_all(files: list[Path]) -> int:
    view = memoryview(bytearray(PIECE))
    read = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                read += n
    return read


def io_floor(src: Path, dst: Path, out_sizes: list[int]) -> dict:
    """Read every input shard fully, then write ``out_sizes`` bytes in 64 MiB pieces, each file fsync'ed."""
    started = time.monotonic()
    read = read_all(sorted(src.glob("*.safetensors")))
    dst.mkdir(parents=True)
    data = pattern()
    for i, size in enumerate(out_sizes):
        write_file(dst / f"out-{i:05d}.bin", size, data)
    return {"seconds": time.monotonic() - started, "read": read, "written": sum(out_sizes)}


def io_overlap(src: Path, dst: Path, out_sizes: list[int]) -> dict:
    """The same bytes with one reader and two writers (files i, i+2, … each) running at once."""
    started = time.monotonic()
    dst.mkdir(parents=True)
    data = pattern()

    def writer(k: int) -> None:
        for i in range(k, len(out_sizes), WRITERS):
            write_file(dst / f"out-{i:05d}.bin", out_sizes[i], data)

    with ThreadPoolExecutor(WRITERS + 1) as pool:
        reading = pool.submit(read_all, sorted(src.glob("*.safetensors")))
        writing = [pool.submit(writer, k) for k in range(WRITERS)]
        read = reading.result()
        for w in writing:
            w.result()
    return {"seconds": time.monotonic() - started, "read": read, "written": sum(out_sizes)}


def naive(src: Path, dst: Path, device: str) -> dict:
    """Shard by shard, the way DeepSeek's ``inference/fp8_cast_bf16.py`` does it (written afresh here).

    ``load_file`` a whole shard onto the device; dequantize each FP8 weight with its ``weight_scale_inv``
    (fp32 multiply over 128x128 blocks, then a bf16 cast); keep the other tensors; ``save_file`` the shard.
    A scale stored in another shard is found through the index and that whole shard is loaded too; at most
    two loaded shards stay cached, the oldest dropped first. Ends with ``os.sync()``.
    """
    import torch
    from safetensors.torch import load_file, save_file

    started = time.monotonic()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = index["weight_map"]
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def tensor(key: str) -> torch.Tensor:
        shard = weight_map[key]
        if shard not in cache:
            cache[shard] = load_file(str(src / shard), device=device)
        return cache[shard][key]

    def dequant(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        rows, cols = w.shape
        full = s.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
        return w.float().mul_(full).to(torch.bfloat16)

    dst.mkdir(parents=True)
    new_map: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        state = cache.pop(shard, None) or load_file(str(src / shard), device=device)
        cache[shard] = state
        out: dict[str, torch.Tensor] = {}
        for key, t in state.items():
            if key.endswith("_scale_inv"):
                continue
            out[key] = dequant(t, tensor(key + "_scale_inv")) if t.element_size() == 1 else t
        save_file(out, str(dst / shard), metadata={"format": "pt"})
        new_map.update(dict.fromkeys(out, shard))
        del out, state
        while len(cache) > 2:
            del cache[next(iter(cache))]
    shutil.copy(src / "config.json", dst / "config.json")
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": new_map}, indent=2))
    os.sync()
    return {"seconds": time.monotonic() - started, **gpu_peak()}


def recast(gpu_file: Path, argv: list[str]) -> int:
    """``worker.cli.main(argv)`` (its JSON report goes to stdout), then this process's GPU peak to a file."""
    sys.path.insert(0, str(ROOT))
    from worker.cli import main as cli_main

    rc = cli_main(argv)
    gpu_file.write_text(json.dumps(gpu_peak()))
    return rc


def child_main(mode: str, args: list[str]) -> int:
    if mode == "recast":
        return recast(Path(args[0]), args[1:])
    if mode == "generate":
        generate(Path(args[0]), Shape(**json.loads(args[1])))
        return 0
    if mode == "startup":
        result = startup(args[0])
    elif mode == "naive":
        result = naive(Path(args[0]), Path(args[1]), args[2])
    elif mode in ("floor", "overlap"):
        work = io_floor if mode == "floor" else io_overlap
        result = work(Path(args[0]), Path(args[1]), json.loads(args[2]))
    elif mode == "compare":
        result = same_files(Path(args[0]), Path(args[1]))
    else:
        raise SystemExit(f"unknown child mode {mode!r}")
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------ harness


@dataclass
class Result:
    row: str
    wall: float  # child wall time, interpreter start included, plus the os.sync() after it
    own: float | None  # the child's own timer (recast: the report's ``seconds``)
    bytes_in: int
    bytes_out: int
    rss: int
    gpu_alloc: int | None = None
    gpu_reserved: int | None = None


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def self_child(mode: str, *args: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--child", mode, *args]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def st_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def st_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in st_files(d))


def bf16_sizes(src: Path) -> list[int]:
    """Per input shard, the bytes of its bf16 output: FP8 weights doubled, FP4 (int8 or uint8, two codes a
    byte) quadrupled, scales dropped, the rest kept.

    Read from the safetensors headers (8-byte length, then JSON), so the floor can run before recast has.
    """
    sizes = []
    for f in st_files(src):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        header.pop("__metadata__", None)
        n = 0
        for key, info in header.items():
            lo, hi = info["data_offsets"]
            if not key.endswith(("_scale_inv", ".scale", ".weight_scale")):
                n += {"F8_E4M3": 2, "I8": 4, "U8": 4}.get(info["dtype"], 1) * (hi - lo)
        sizes.append(n)
    return sizes


class PageCache:
    """Drops the page cache before each row when allowed; says once when it cannot."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.dropped = False
        if not enabled:
            print(f"{WARM} (--no-drop-caches)", flush=True)

    def drop(self) -> None:
        os.sync()
        if not self.enabled:
            return
        try:
            with open("/proc/sys/vm/drop_caches", "w") as fh:
                fh.write("3\n")
            self.dropped = True
        except OSError as exc:
            self.enabled = False
            print(f"{WARM} ({exc.strerror or exc})", flush=True)


def gb_s(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f}" if nbytes and seconds > 0 else "-"


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


class Bench:
    def __init__(self, work: Path, shape: Shape, device: str, repeat: int, cache: PageCache):
        self.work, self.shape, self.device, self.repeat, self.cache = work, shape, device, repeat, cache
        self.src, self.native, self.logs = work / "src", work / "native", work / "logs"
        self.results: dict[str, Result] = {}
        self.identity: dict[str, dict] = {}
        self.runs = 0

    def label(self, name: str) -> str:
        self.runs += 1
        return f"{self.runs:02d}-{name}"

    def child(self, label: str, argv: list[str], writes: bool = True) -> tuple[str, float, int]:
        """Drop the cache, run one child, add the sync that makes its writes durable to its time."""
        self.cache.drop()
        out, wall, rss = measure(argv, label, self.logs, child_env())
        if writes:
            started = time.monotonic()
            os.sync()
            wall += time.monotonic() - started
        return out, wall, rss

    def best(self, name: str, once: Callable[[], Result]) -> Result:
        """Run ``once`` ``repeat`` times and keep the fastest; print it as soon as it is known."""
        result = min((once() for _ in range(self.repeat)), key=lambda r: r.wall)
        self.results[name] = result
        print(
            f"  {ROWS.get(name, name):30} {result.wall:8.1f} s wall   own {fmt(result.own):>7} s   "
            f"RSS {gib(result.rss)} GiB   GPU {gib(result.gpu_alloc)} GiB",
            flush=True,
        )
        return result

    def prepare(self) -> None:
        shutil.rmtree(self.logs, ignore_errors=True)  # this run's children only
        self.logs.mkdir(parents=True)
        marker = self.work / "checkpoint.json"  # beside src, not in it: recast copies unknown files along
        if marker.exists() and json.loads(marker.read_text()) == asdict(self.shape) and st_files(self.src):
            print(f"reusing the checkpoint in {self.src}", flush=True)
        else:
            shutil.rmtree(self.src, ignore_errors=True)
            started = time.monotonic()
            marker.unlink(missing_ok=True)
            measure(
                self_child("generate", str(self.src), json.dumps(asdict(self.shape))),
                "generate",
                self.logs,
                child_env(),
            )
            marker.write_text(json.dumps(asdict(self.shape)) + "\n")  # after the child: a complete checkpoint
            print(f"generated the synthetic checkpoint in {time.monotonic() - started:.1f} s", flush=True)

    def startup_row(self) -> None:
        """A bare torch child (and CUDA context): the start-up every torch row's wall time includes."""
        infos: dict[float, dict] = {}

        def once() -> Result:
            label = self.label("startup")
            out, wall, rss = self.child(label, self_child("startup", self.device), writes=False)
            info = infos[wall] = last_json(out)
            return Result(
                "startup", wall, info["seconds"], 0, 0, rss, info.get("gpu_alloc"), info.get("gpu_reserved")
            )

        info = infos[self.best("startup", once).wall]
        self.device = info["device"]  # resolves auto
        gpu = f", {info['gpu_name']}" if info["gpu_name"] else ""
        print(
            f"  device {info['device']}{gpu}; torch {info['torch']}: import {info['import_s']:.1f} s"
            + (f", CUDA init {info['cuda_init_s']:.1f} s" if info["cuda_init_s"] is not None else ""),
            flush=True,
        )

    def floor_row(self, name: str, out_sizes: list[int]) -> None:
        dst = self.work / f"out-{name}"

        def once() -> Result:
            shutil.rmtree(dst, ignore_errors=True)
            out, wall, rss = self.child(
                self.label(name), self_child(name, str(self.src), str(dst), json.dumps(out_sizes))
            )
            io = last_json(out)
            shutil.rmtree(dst)
            return Result(name, wall, io["seconds"], io["read"], io["written"], rss)

        self.best(name, once)

    def naive_row(self) -> None:
        dst = self.work / "out-naive"

        def once() -> Result:
            shutil.rmtree(dst, ignore_errors=True)
            out, wall, rss = self.child(
                self.label("naive"), self_child("naive", str(self.src), str(dst), self.device)
            )
            info = last_json(out)
            result = Result(
                "naive", wall, info["seconds"], st_bytes(self.src), st_bytes(dst), rss,
                info.get("gpu_alloc"), info.get("gpu_reserved"),
            )  # fmt: skip
            shutil.rmtree(dst)
            return result

        self.best("naive", once)

    def recast_once(self, name: str, src: Path, dst: Path, to: str, verify: bool) -> Result:
        shutil.rmtree(dst, ignore_errors=True)
        label = self.label(name)
        gpu_file = self.logs / f"{label}.gpu.json"
        argv = ["convert", str(src), str(dst), "--to", to, "--device", self.device, "--json"]
        argv += ["--quantize", "keep"] if to == "hf" else []
        argv += [] if verify else ["--no-verify"]
        out, wall, rss = self.child(label, self_child("recast", str(gpu_file), *argv))
        report = json.loads(out)
        summary = report["summary"]
        if verify and not summary["passed"]:
            raise StepFailed(f"{name}: verification did not pass: {summary}")
        gpu = json.loads(gpu_file.read_text()) if gpu_file.exists() else {}
        return Result(
            name, wall, report.get("seconds"), st_bytes(src), st_bytes(dst), rss,
            gpu.get("gpu_alloc"), gpu.get("gpu_reserved"),
        )  # fmt: skip

    def recast_row(self, name: str) -> None:
        self.best(name, lambda: self.recast_once(name, self.src, self.native, "native", name == "recast"))

    def back_row(self, name: str) -> None:
        if not (self.native / "model.safetensors.index.json").exists():
            print("  converting to native first (untimed, --no-verify), for the way back", flush=True)
            self.recast_once("native-prep", self.src, self.native, "native", verify=False)
        dst = self.work / "back"

        def once() -> Result:
            result = self.recast_once(name, self.native, dst, "hf", verify=name == "back")
            out, _, _ = measure(
                self_child("compare", str(self.src), str(dst)), self.label("compare"), self.logs, child_env()
            )
            self.identity[name] = last_json(out)
            shutil.rmtree(dst)
            return result

        self.best(name, once)
        same = self.identity[name]
        print(f"  {'byte-identical to the source' if same['identical'] else 'NOT IDENTICAL'}: "
              f"{same.get('files', 0)} shards {same['detail']}", flush=True)  # fmt: skip

    def run(self, rows: list[str]) -> int:
        started = time.monotonic()
        self.prepare()
        in_bytes = st_bytes(self.src)
        out_sizes = bf16_sizes(self.src)
        s = self.shape
        print(
            f"input: {s.layers} layers x {s.experts} experts (I={s.inter}, H={s.hidden}), "
            f"{len(st_files(self.src))} shards, {in_bytes / 1e9:.2f} GB quantized; "
            f"bf16 output {sum(out_sizes) / 1e9:.2f} GB",
            flush=True,
        )
        need = in_bytes + sum(out_sizes) + (in_bytes if {"back", "back-nv"} & set(rows) else 0)
        free = shutil.disk_usage(self.work).free
        print(f"workdir {self.work}: {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB more needed at once",
              flush=True)  # fmt: skip
        if free < need:
            print("WARNING: the disk may fill up", flush=True)
        self.startup_row()
        for name in rows:
            if name in ("floor", "overlap"):
                self.floor_row(name, out_sizes)
            elif name == "naive":
                self.naive_row()
            elif name in ("recast", "recast-nv"):
                self.recast_row(name)
            else:
                self.back_row(name)
        for name in ("recast", "recast-nv"):
            if name in self.results and abs(self.results[name].bytes_out - sum(out_sizes)) > 1 << 20:
                print(f"note: {name} wrote {self.results[name].bytes_out / 1e9:.3f} GB, the floor "
                      f"{sum(out_sizes) / 1e9:.3f} GB", flush=True)  # fmt: skip
        self.report()
        print(f"the whole benchmark took {time.monotonic() - started:.0f} s")
        return 0 if all(i["identical"] for i in self.identity.values()) else 1

    def report(self) -> None:
        floor = self.results.get("floor")
        start = self.results["startup"]
        caches = "dropped before every row" if self.cache.dropped else "NOT dropped (warm-cache upper bounds)"
        print(f"\npage cache: {caches}; device {self.device}; best of {self.repeat}\n")
        head = ["row", "wall s", "own s", "GB/s in", "GB/s out", "peak RSS GiB", "GPU alloc GiB",
                "GPU reserved GiB", "x floor"]  # fmt: skip
        print("| " + " | ".join(head) + " |")
        print("| --- " + "| ---: " * (len(head) - 1) + "|")
        for name, r in self.results.items():
            label = "start-up: import torch" + (" + CUDA init" if self.device == "cuda" else "")
            ratio = f"{r.wall / floor.wall:.2f}" if floor and name != "startup" else "-"
            cells = [
                label if name == "startup" else ROWS[name], f"{r.wall:.1f}", fmt(r.own),
                gb_s(r.bytes_in, r.wall), gb_s(r.bytes_out, r.wall), gib(r.rss), gib(r.gpu_alloc),
                gib(r.gpu_reserved), ratio,
            ]  # fmt: skip
            print("| " + " | ".join(cells) + " |")
        print()
        if not floor:
            print("no serial floor row: no ratios")
            return
        print(f"serial floor {floor.wall:.1f} s; a bare torch child takes {start.wall:.1f} s to start "
              f"(included in every torch row's wall time)")  # fmt: skip
        lines = {
            "overlap": ("I/O floor, overlapped", None),
            "naive": ("naive", None),
            "recast": ("recast verified", TARGETS["recast"]),
            "recast-nv": ("recast --no-verify", TARGETS["recast-nv"]),
            "back": ("back", None),
            "back-nv": ("back --no-verify", None),
        }
        for name, (text, target) in lines.items():
            if name not in self.results:
                continue
            r = self.results[name]
            line = f"{text}: {r.wall / floor.wall:.2f}x floor"
            if name != "overlap":
                line += f" ({(r.wall - start.wall) / floor.wall:.2f}x less the start-up)"
            if target is not None:
                line += f" (target <= {target:.2f}x)"
            if name in self.identity:
                line += "; byte-identical" if self.identity[name]["identical"] else "; NOT BYTE-IDENTICAL"
            print(line)
        parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if parent >= start.rss:
            print(
                f"WARNING: this harness's own peak RSS ({parent / GIB:.2f} GiB) may have inflated its children's"
            )


def parse_rows(text: str) -> list[str]:
    wanted = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    return [r for r in ROWS if r in wanted]  # always in the table's order


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child_main(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, help="where the checkpoint and outputs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and logs for a later run")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--inter", type=int, default=2048, help="expert width I (gate/up [I, H], down [H, I])")
    p.add_argument("--hidden", type=int, default=7168, help="hidden size H")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--shards", type=int, default=6)
    p.add_argument("--repeat", type=int, default=1, help="run each row N times and keep the fastest")
    p.add_argument("--rows", type=parse_rows, default=list(DEFAULT_ROWS),
                   help=f"comma-separated, from {','.join(ROWS)} (default: all but back-nv)")  # fmt: skip
    p.add_argument("--no-drop-caches", action="store_true", help="leave the page cache alone (warm figures)")
    p.add_argument("--family", choices=tuple(_SPECS), default="deepseek-v3",
                   help="deepseek-v4, kimi-k3: the release's names and FP4 routed experts")  # fmt: skip
    args = p.parse_args()
    if args.family != "deepseek-v3" and "naive" in args.rows:
        p.error(
            f"the naive row reads DeepSeek-V3's *_scale_inv layout only: leave it out with --family {args.family}"
        )
    shape = Shape(
        args.layers, args.experts, args.inter, args.hidden, args.vocab, args.shards, family=args.family
    )
    work = args.workdir or Path(tempfile.mkdtemp(prefix="recast-gpu-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(work.resolve(), shape, args.device, max(1, args.repeat), PageCache(not args.no_drop_caches))
    try:
        return bench.run(args.rows)
    except StepFailed as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    finally:
        for name in ("native", "back", "out-floor", "out-overlap", "out-naive"):
            shutil.rmtree(work / name, ignore_errors=True)
        if args.keep:
            print(f"kept the checkpoint {work / 'src'} and the children's output in {work / 'logs'}")
        elif args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for name in ("src", "logs"):
                shutil.rmtree(work / name, ignore_errors=True)
            (work / "checkpoint.json").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
