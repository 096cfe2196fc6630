"""Every family's native output equals NeMo AutoModel 0.7.0's own ``from_hf`` on the same weights, bit for bit.

Each case builds a tiny vendor-style FP8 checkpoint from transformers' own model class (tests/checkpoints.py),
converts it with the engine, and compares the result with what NeMo's state-dict adapter for the family
makes of the same state dict (NeMo imported as tests/nemo_oracle.py explains); the way back must then
restore the source byte for byte. Where NeMo has no adapter (dense families: its model classes use the hf
names) or one that loads bf16 only (Qwen3-MoE, GLM-4.x MoE), the FP8 step is NeMo's own DeepSeek-V3
``dequantize_from_fp8``, which is what those checkpoints get when loaded through ``deepseek-v3``; the
same goes for adapters that mishandle FP8 (Step, Qwen3-VL-MoE, Qwen3.5-MoE's non-expert weights), each
shown by a test of its own. Where NeMo loads a family through transformers' own class (Gemma 3 VLM), the
oracle is that class's ``from_pretrained``. Where NeMo's adapter raises, the case names the error and
the output is checked against the documented semantics (tests/reference.py) instead. gpt-oss's experts
are MXFP4, not FP8: NeMo's gpt-oss adapter dequantizes them itself (tests/test_mxfp4.py has the rest).
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nemo_oracle
import pytest
import reference
import torch
from checkpoints import load_state_dict
from helpers import assert_state_dicts_identical, config
from safetensors.torch import save_file

from worker.engine import api
from worker.engine.adapters import ADAPTERS
from worker.engine.checkpoint import SIDECAR
from worker.engine.errors import RecastError

pytestmark = pytest.mark.nemo


@dataclass(frozen=True)
class Case:
    """One fixture family, the adapter detection must pick for it, and the NeMo adapter it must equal.

    ``nemo``: ``module.Class`` under ``nemo_automodel.components.models`` (None: NeMo loads hf keys as
    they are). ``dequantizes``: that adapter's ``from_hf`` handles FP8 itself (``nemo_dequantizes_only``:
    for these keys only). ``nemo_raises``: NeMo's
    adapter fails on this checkpoint; tests/reference.py is the yardstick instead.
    """

    family: str
    adapter: str
    nemo: str | None
    dequantizes: bool = True
    scheme: str = "block"
    layout: str = "default"
    nemo_raises: type[Exception] | None = None
    # A pattern of the keys that NeMo's from_hf dequantizes itself; the rest are dequantized beforehand.
    nemo_dequantizes_only: str | None = None
    # Keyword arguments NeMo's model class passes its adapter (Qwen3.5-MoE's text model: text_only=True).
    nemo_kwargs: tuple[tuple[str, Any], ...] = ()
    # BackendConfig fields the native names depend on (MiMo's attention sink under Transformer Engine).
    nemo_backend: tuple[tuple[str, Any], ...] = ()
    override: bool = False  # the adapter is a variant, chosen by --adapter rather than detected
    # NeMo loads this family through transformers' own class (from_pretrained), whose renames make the
    # native names (Gemma 3 VLM); with ``nemo`` None the oracle loads the dequantized checkpoint that way.
    through_transformers: bool = False
    # Keys where NeMo's adapter writes +0.0 for the FP4 code of -0 (its DeepSeek-V4 e2m1 table lists 0.0
    # twice): equal by value, and Recast keeps the sign the way back needs (test_deepseek_v4_fp4_...).
    nemo_unsigned_zero: str | None = None
    # NeMo's adapter reads model.safetensors.index.json beside config.json (MiMo-V2.5's tp_size): the
    # oracle's config names the checkpoint's directory, as from_pretrained's does.
    reads_index: bool = False
    # NeMo's adapter for the mtp.* layers its backbone adapter drops (DeepSeek-V4.1's DSpark draft), built
    # on the text config.
    nemo_mtp: str | None = None


_DEEPSEEK = "deepseek_v3.DeepSeekV3StateDictAdapter"
_MISTRAL3 = "mistral3.Mistral3FP8StateDictAdapter"
_MISTRAL4 = "mistral4.Mistral4StateDictAdapter"
_MISTRAL4_VLM = "mistral4.Mistral4MultimodalStateDictAdapter"
_QWEN3_5 = "qwen3_5_moe.Qwen3_5MoeStateDictAdapter"
_SPLIT_EXPERT = r"\.mlp\.experts\.\d+\."
_QWEN3_5_DENSE = "qwen3_5.Qwen3_5DenseStateDictAdapter"
_FP32_HOLDERS = (("route_linear_attn_fp32_params", True),)  # as both Qwen3.5 dense model classes build it
_GPT_OSS = "gpt_oss.GPTOSSStateDictAdapter"
CASES = [
    Case("qwen3-moe", "qwen3-moe", "qwen3_moe.Qwen3MoeStateDictAdapter", dequantizes=False),
    Case("glm4-moe", "glm4-moe", "glm4_moe.Glm4MoeStateDictAdapter", dequantizes=False),
    Case("glm4-moe-lite", "glm4-moe", "glm4_moe.Glm4MoeStateDictAdapter", dequantizes=False),
    Case("kimi-k2", "kimi-k2", _DEEPSEEK),
    Case("deepseek-v3", "deepseek-v3", _DEEPSEEK),
    Case("deepseek-v32", "deepseek-v32", "deepseek_v32.DeepSeekV32StateDictAdapter"),
    Case("glm-moe-dsa", "glm-moe-dsa", "glm_moe_dsa.GlmMoeDsaStateDictAdapter"),
    # NeMo renames MiMo's attention_sink_bias (to attn_module.softmax_offset, fp32) only under Transformer
    # Engine; Recast writes the other backends' names, so the oracle is asked for sdpa whatever the machine.
    Case("mimo-v2-flash", "mimo-v2-flash", "mimo_v2_flash.MiMoV2FlashStateDictAdapter",
         nemo_backend=(("attn", "sdpa"),)),
    Case("mimo-v2-flash", "mimo-v2-flash-te", "mimo_v2_flash.MiMoV2FlashStateDictAdapter",
         nemo_backend=(("attn", "te"),), override=True),
    # MiMo-V2.5-Pro: NeMo's adapter regroups the shard-interleaved FP8 qkv_proj itself, grid by grid.
    Case("mimo-v2.5-pro", "mimo-v2.5-pro", "mimo_v25.MiMoV2StateDictAdapter"),
    # MiMo-V2.5 as MiMoV2ForCausalLM: NeMo's MiMo-V2-Flash adapter splits it into q/k/v_proj, by tp_size.
    Case("mimo-v2", "mimo-v2", "mimo_v2_flash.MiMoV2FlashStateDictAdapter", nemo_backend=(("attn", "sdpa"),),
         reads_index=True),
    Case("mimo-v2", "mimo-v2-te", "mimo_v2_flash.MiMoV2FlashStateDictAdapter", nemo_backend=(("attn", "te"),),
         reads_index=True, override=True),
    # MiMo-V2.6: the same, its routed experts uint8 MXFP4 (K.weight_scale), which NeMo dequantizes itself.
    Case("mimo-v2", "mimo-v2", "mimo_v2_flash.MiMoV2FlashStateDictAdapter", nemo_backend=(("attn", "sdpa"),),
         reads_index=True, scheme="fp8-mxfp4"),
    Case("minimax-m2", "minimax-m2", "minimax_m2.MiniMaxM2StateDictAdapter"),
    # MXFP8: NeMo's M3 adapter dequantizes the e8m0-scaled weights itself (its dequantize_mxfp8).
    Case("minimax-m3", "minimax-m3", "minimax_m3_vl.MiniMaxM3VLStateDictAdapter", scheme="mxfp8"),
    # NeMo's Step adapters load bf16 only: Step3p5's has no FP8 path, Step3p7's drops the *_scale_inv
    # tensors without dequantizing (test_step3p7_nemo_drops_the_scales); the FP8 step is NeMo's own
    # dequantize_from_fp8, per expert for the aggregated 3-D experts.
    # NeMo's Qwen3.5-MoE adapter dequantizes the split experts but passes every other FP8 weight on
    # unscaled (test_nemo_qwen3_5_moe_dequantizes_only_the_experts); those go through dequantize_from_fp8.
    Case("qwen3.5-moe", "qwen3.5-moe", _QWEN3_5, nemo_dequantizes_only=_SPLIT_EXPERT),
    Case("qwen3.5-moe-text", "qwen3.5-moe", _QWEN3_5, nemo_dequantizes_only=_SPLIT_EXPERT,
         nemo_kwargs=(("text_only", True),)),
    Case("glm5-next", "glm5-next", "glm5_next.Glm5NextStateDictAdapter"),
    # NeMo's dense Qwen3.5 adapter has no FP8 path (renames and fp32 holders only): dequantize_from_fp8 first.
    Case("qwen3.5", "qwen3.5", _QWEN3_5_DENSE, dequantizes=False, nemo_kwargs=_FP32_HOLDERS),
    Case("qwen3.5-text", "qwen3.5", _QWEN3_5_DENSE, dequantizes=False, nemo_kwargs=_FP32_HOLDERS),
    # NeMo's Qwen3-Next adapter has no FP8 path (it loads the bf16 release): dequantize_from_fp8 first.
    Case("qwen3-next", "qwen3-next", "qwen3_next.Qwen3NextStateDictAdapter", dequantizes=False),
    # NeMo's Qwen3-VL-MoE adapter drops the *_scale_inv tensors without dequantizing
    # (test_nemo_qwen3_vl_moe_drops_the_scales): dequantize_from_fp8 first, per expert for the 3-D experts.
    Case("qwen3-vl-moe", "qwen3-vl-moe", "qwen3_vl_moe.Qwen3VLMoeStateDictAdapter", dequantizes=False),
    # NeMo's Qwen3-Omni-MoE adapter drops the *_scale_inv tensors without dequantizing, as Qwen3-VL-MoE's.
    Case("qwen3-omni-moe", "qwen3-omni-moe", "qwen3_omni_moe.Qwen3OmniMoeStateDictAdapter", dequantizes=False),
    Case("step3p5", "step3p5", "step3p5.Step3p5StateDictAdapter", dequantizes=False),
    # Ling 2.0 ships bf16 only and NeMo's adapter has no FP8 path: a block-FP8 Ling (quantized here like
    # the others) goes through dequantize_from_fp8 first; test_ling_v2_bf16_release_equals_nemo has the
    # bf16 release. transformers has no Ling class: the checkpoint is GLM-4.5-MoE re-spelled
    # (checkpoints._as_ling), q/k/v fused as NeMo's adapter documents.
    Case("ling-v2", "ling-v2", "ling_v2.BailingMoeV2StateDictAdapter", dequantizes=False),
    Case("step3p7", "step3p7", "step3p7.Step3p7StateDictAdapter", dequantizes=False),
    # DeepSeek-V4: NeMo's adapter dequantizes the e8m0 block scales and the FP4 experts itself.
    Case("deepseek-v4", "deepseek-v4", "deepseek_v4.DeepSeekV4StateDictAdapter", scheme="fp8-v4",
         nemo_unsigned_zero=r"mlp\.experts\."),
    Case("deepseek-v4", "deepseek-v4", "deepseek_v4.DeepSeekV4StateDictAdapter", scheme="fp8-v4-base"),
    # DeepSeek-V4.1: NeMo's adapter dequantizes the 32x32 e8m0 blocks, the FP4 experts (reading the code
    # of -0 as +0, as V4's) and the Engram table's per-row exponents itself; it drops the MTP (DSpark
    # draft) layers, which its draft adapter loads apart: the two together are the oracle.
    Case("deepseek-v4.1", "deepseek-v4.1", "deepseek_v41.DeepseekV41StateDictAdapter", scheme="fp8-v41",
         nemo_unsigned_zero=r"ffn\.experts\.", nemo_mtp="deepseek_v41.DeepseekV41DSparkStateDictAdapter"),
    # NeMo's Nemotron-H adapter has no FP8 path (it loads the bf16 release): dequantize_from_fp8 first.
    Case("nemotron-v3", "nemotron-v3", "nemotron_v3.NemotronV3StateDictAdapter", dequantizes=False),
    # NeMo's Inkling adapter skips every *_scale_inv and casts the FP8 codes: dequantize_from_fp8 first.
    Case("inkling", "inkling", "inkling.InklingStateDictAdapter", dequantizes=False),
    # gpt-oss: NeMo's adapter dequantizes the MXFP4 experts itself (transformers' convert_moe_packed_tensors,
    # copied); under Transformer Engine it also renames the attention sinks (the gpt-oss-te variant).
    Case("gpt-oss", "gpt-oss", _GPT_OSS, scheme="mxfp4", nemo_backend=(("attn", "sdpa"),)),
    Case("gpt-oss", "gpt-oss-te", _GPT_OSS, scheme="mxfp4", nemo_backend=(("attn", "te"),), override=True),
    # NeMo's Hy3 adapter drops the *_scale_inv tensors without dequantizing: dequantize_from_fp8 first.
    Case("hy-v3", "hy-v3", "hy_v3.HYV3StateDictAdapter", dequantizes=False),
    # NeMo's ERNIE 4.5 MoE adapter drops the *_scale_inv tensors without dequantizing, as Hy3's.
    Case("ernie4.5-moe", "ernie4.5-moe", "ernie4_5.Ernie4_5_MoeStateDictAdapter", dequantizes=False),
    # NeMo's Kimi Linear and Laguna adapters drop the *_scale_inv tensors without dequantizing.
    Case("kimi-linear", "kimi-linear", "kimi_linear.KimiLinear48BStateDictAdapter", dequantizes=False),
    Case("laguna", "laguna", "laguna.LagunaStateDictAdapter", dequantizes=False),
    # Kimi K3: NeMo's adapter dequantizes the MXFP4 experts (compressed-tensors' weight_packed / weight_scale)
    # itself and strips A_log's zero padding.
    Case("kimi-k3", "kimi-k3", "kimi_k3.KimiK3StateDictAdapter", scheme="mxfp4-ct"),
    Case("qwen3", "qwen3", None),
    Case("ernie4.5", "ernie4.5", None),
    Case("llama", "llama", None),
    Case("gemma3", "gemma3", None),
    Case("gemma3-vlm", "gemma3-vlm", None, through_transformers=True),
    Case("gemma4", "gemma4", None, through_transformers=True),
    Case("gemma4-text", "gemma4", None, through_transformers=True),
    # NeMo's Gemma 4 Unified adapter renames only (no FP8 path): dequantize_from_fp8 first.
    Case("gemma4-unified", "gemma4-unified", "gemma4_unified.Gemma4UnifiedStateDictAdapter", dequantizes=False),
    Case("mistral", "mistral3-fp8", _MISTRAL3, scheme="per-tensor"),
    Case("mistral3-fp8", "mistral3-fp8", _MISTRAL3, scheme="per-tensor", layout="causal"),
    Case("mistral3-fp8", "mistral3-fp8", _MISTRAL3, scheme="per-tensor"),
    Case("mistral3-fp8", "mistral3-fp8", _MISTRAL3, scheme="per-tensor", layout="identity"),
    Case("mistral4", "mistral4", _MISTRAL4, scheme="per-tensor"),
    Case("mistral4", "mistral4", _MISTRAL4, scheme="per-expert", layout="prefixed"),
    Case("mistral4-vlm", "mistral4-vlm", _MISTRAL4_VLM, scheme="per-expert"),
    # NeMo 0.7.0 indexes the 3-D expert block scales as if they were 2-D and raises IndexError.
    Case("mistral4", "mistral4", _MISTRAL4, nemo_raises=IndexError),
    Case("mistral4-vlm", "mistral4-vlm", _MISTRAL4_VLM, nemo_raises=IndexError),
]  # fmt: skip


def _id(case: Case) -> str:
    parts = (case.family, case.scheme, case.layout, case.adapter if case.override else "default")
    return "-".join(p for p in parts if p != "default")


@pytest.fixture(scope="module")
def nemo() -> None:
    nemo_oracle.load()


def _nemo_adapter(case: Case, cfg: dict[str, Any]) -> Any:
    cls = nemo_oracle.adapter_class(case.nemo)
    if hasattr(cls, "for_causal_lm"):  # Mistral 3: one factory per model class
        return cls.for_vlm_full(cfg) if "text_config" in cfg else cls.for_causal_lm(cfg)
    if "config" not in inspect.signature(cls).parameters:  # a dense adapter: its model class's kwargs only
        return cls(**dict(case.nemo_kwargs))
    return nemo_oracle.moe_adapter(
        case.nemo, cfg, torch.bfloat16, dict(case.nemo_backend), **dict(case.nemo_kwargs)
    )


def _nemo_native(case: Case, sd: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What NeMo AutoModel loads from this hf state dict, in its native key space (bf16)."""
    sd = dict(sd)
    if case.nemo is None or not case.dequantizes:
        sd = nemo_oracle.dequantize(sd, torch.bfloat16)
    elif case.nemo_dequantizes_only:
        own = {k: v for k, v in sd.items() if re.search(case.nemo_dequantizes_only, k)}
        sd = {**nemo_oracle.dequantize({k: v for k, v in sd.items() if k not in own}, torch.bfloat16), **own}
    if case.through_transformers:
        return _transformers_state_dict(sd, cfg)
    if case.nemo is None:
        return sd
    native = _nemo_adapter(case, cfg).from_hf(dict(sd))
    if case.nemo_mtp:
        text = {**cfg["text_config"], "architectures": cfg["architectures"]}
        draft = nemo_oracle.moe_adapter(case.nemo_mtp, text, torch.bfloat16).from_hf(dict(sd))
        assert not [k for k in native if k.startswith("mtp.")]
        native |= {k: t for k, t in draft.items() if k.startswith("mtp.")}
    return native


def _transformers_state_dict(sd: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of transformers' own class loaded with from_pretrained from ``sd`` (bf16)."""
    import transformers

    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    if "text_config" in cfg:
        cfg["text_config"] = {k: v for k, v in cfg["text_config"].items() if k != "quantization_config"}
    with tempfile.TemporaryDirectory(prefix="recast-oracle-") as tmp:
        save_file({k: t.contiguous() for k, t in sd.items()}, str(Path(tmp) / "model.safetensors"))
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        cls = getattr(transformers, cfg["architectures"][0])
        model = cls.from_pretrained(tmp, dtype=torch.bfloat16)
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_native_equals_nemo_and_round_trips(case: Case, nemo, checkpoint, tmp_path: Path) -> None:
    assert ADAPTERS[case.adapter].nemo == case.nemo
    src = checkpoint(case.family, scheme=case.scheme, layout=case.layout)
    native = tmp_path / "native"
    report = api.convert(
        src, native, api.Options(to="native", adapter=case.adapter if case.override else None)
    )
    assert report.passed and report.adapter == case.adapter
    source_sd, cfg = load_state_dict(src), config(src)
    if case.reads_index:
        cfg = {**cfg, "name_or_path": str(src)}
    got = load_state_dict(native)

    if case.nemo_raises:
        with pytest.raises(case.nemo_raises):
            _nemo_native(case, source_sd, cfg)
        want = reference.hf_to_native(source_sd, cfg, case.adapter)
    else:
        want = _nemo_native(case, source_sd, cfg)
    if case.nemo_unsigned_zero:
        want = _with_signed_zeros(want, got, case.nemo_unsigned_zero)
    assert_state_dicts_identical(got, want)

    api.convert(native, tmp_path / "back", api.Options(to="hf"))
    assert_state_dicts_identical(load_state_dict(tmp_path / "back"), source_sd)


def _with_signed_zeros(
    want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], pattern: str
) -> dict[str, torch.Tensor]:
    """``want`` with Recast's tensors in place of NeMo's for the keys ``pattern`` matches, once each is
    shown equal to NeMo's by value and different in bits only where Recast has -0.0 and NeMo +0.0."""
    out = dict(want)
    for key in [k for k in want if re.search(pattern, k)]:
        assert torch.equal(got[key], want[key]), key  # by value: -0.0 == +0.0
        differ = got[key].view(torch.int16) != want[key].view(torch.int16)
        assert bool(
            (got[key][differ].signbit() & ~want[key][differ].signbit() & (want[key][differ] == 0)).all()
        )
        out[key] = got[key]
    return out


def test_deepseek_v4_fp4_experts_equal_transformers_dequantization(nemo, checkpoint, tmp_path: Path) -> None:
    # NeMo's DeepSeek-V4 adapter reads the e2m1 code 8 (-0) as +0.0; the OCP definition, transformers'
    # own FP4 loader (Fp8Dequantize, which reads DeepSeek-V4-Flash) and gpt-oss's MXFP4 path read -0.0,
    # and the way back needs the sign to restore the code. So the FP4 experts are checked bit for bit
    # against transformers' dequantization, stacked as NeMo stacks them, and shown to hold signed zeros.
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    src = checkpoint("deepseek-v4", scheme="fp8-v4")
    assert api.convert(src, tmp_path / "native", api.Options(to="native")).passed
    sd, got = load_state_dict(src), load_state_dict(tmp_path / "native")
    one = Fp8Dequantize(None)._dequantize_one

    def expert(prefix: str, e: int, part: str) -> torch.Tensor:
        key = f"{prefix}ffn.experts.{e}.{part}"
        return one(sd[f"{key}.weight"], sd[f"{key}.scale"], torch.bfloat16)

    for prefix, native in (("layers.1.", "model.layers.1."), ("mtp.0.", "mtp.layers.0.")):
        up = torch.stack(
            [torch.cat([expert(prefix, e, "w1").T, expert(prefix, e, "w3").T], -1) for e in range(4)]
        )
        down = torch.stack([expert(prefix, e, "w2").T for e in range(4)])
        assert_state_dicts_identical(
            {k: got[f"{native}mlp.experts.{k}"] for k in ("gate_and_up_projs", "down_projs")},
            {"gate_and_up_projs": up, "down_projs": down},
        )
    assert bool(
        got["model.layers.1.mlp.experts.down_projs"]
        .signbit()[got["model.layers.1.mlp.experts.down_projs"] == 0]
        .any()
    )


def test_every_adapter_has_an_oracle_case() -> None:
    assert {c.adapter for c in CASES} == set(ADAPTERS)


def test_nemo_step_adapters_have_no_fp8_path(nemo, checkpoint) -> None:
    # Why the Step cases dequantize with NeMo's dequantize_from_fp8 first: fed the FP8 checkpoint itself,
    # Step3p5StateDictAdapter.from_hf fails, and Step3p7StateDictAdapter.from_hf passes FP8 codes on
    # unscaled (dense weights stay FP8, experts are cast to bf16 without their scales).
    src = checkpoint("step3p5", scheme="block")
    with pytest.raises(RuntimeError, match="Float8"):
        nemo_oracle.moe_adapter("step3p5.Step3p5StateDictAdapter", config(src), torch.bfloat16).from_hf(
            load_state_dict(src)
        )
    src = checkpoint("step3p7", scheme="block")
    sd, cfg = load_state_dict(src), config(src)
    got = nemo_oracle.moe_adapter("step3p7.Step3p7StateDictAdapter", cfg, torch.bfloat16).from_hf(sd)
    assert got["model.language_model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    experts = "model.language_model.layers.1.moe.experts.down_projs"
    right = _nemo_native(next(c for c in CASES if c.family == "step3p7"), sd, cfg)[experts]
    assert not torch.equal(got[experts], right)


@pytest.mark.parametrize(
    "family",
    [
        "step3p5",
        "step3p7",
        "ling-v2",
        "inkling",
        "nemotron-v3",
        "deepseek-v4",
        "hy-v3",
        "ernie4.5-moe",
        "kimi-linear",
        "kimi-k3",
        "laguna",
        "mimo-v2.5-pro",
    ],
)
def test_native_without_recast_json_goes_back_as_nemo_to_hf(family, nemo, checkpoint, tmp_path: Path) -> None:
    # A native checkpoint Recast did not write (no recast.json: the plan comes from inverting the adapter,
    # concat and split included: Ling's q/k/v_proj fuse back into query_key_value; Inkling's numbered
    # vision renames invert too) goes back to the hf
    # keys and shapes NeMo's own to_hf gives, value for value.
    case = next(c for c in CASES if c.family == family)
    src = checkpoint(family, scheme=case.scheme)
    native = tmp_path / "native"
    api.convert(src, native, api.Options(to="native"))
    (native / SIDECAR).unlink()
    report = api.convert(native, tmp_path / "hf", api.Options(to="hf", quantize="none"))
    assert report.passed and report.adapter == case.adapter
    want = _nemo_adapter(case, config(src)).to_hf(load_state_dict(native))
    assert_state_dicts_identical(load_state_dict(tmp_path / "hf"), want)


def test_deepseek_v41_native_without_recast_json_goes_back_as_nemo_to_hf(
    nemo, checkpoint, tmp_path: Path
) -> None:
    # As test_native_without_recast_json_goes_back_as_nemo_to_hf, with NeMo's two V4.1 adapters: the
    # backbone's to_hf for everything but the MTP (DSpark draft) layers, which it leaves out, and the
    # draft's to_hf for those.
    case = next(c for c in CASES if c.adapter == "deepseek-v4.1")
    src = checkpoint("deepseek-v4.1", scheme="fp8-v41")
    native = tmp_path / "native"
    api.convert(src, native, api.Options(to="native"))
    (native / SIDECAR).unlink()
    assert api.convert(native, tmp_path / "hf", api.Options(to="hf", quantize="none")).passed
    sd, cfg = load_state_dict(native), config(src)
    draft = {k: t for k, t in sd.items() if k.startswith("mtp.")}
    text = {**cfg["text_config"], "architectures": cfg["architectures"]}
    want = _nemo_adapter(case, cfg).to_hf({k: t for k, t in sd.items() if k not in draft})
    want |= nemo_oracle.moe_adapter(case.nemo_mtp, text, torch.bfloat16).to_hf(draft)
    assert_state_dicts_identical(load_state_dict(tmp_path / "hf"), want)


@pytest.mark.parametrize("family", ["gpt-oss", "kimi-k3"])
def test_bf16_release_equals_nemo_both_ways(family: str, nemo, plain_checkpoint, tmp_path: Path) -> None:
    # gpt-oss also ships in bf16 (experts gate_up_proj [E, H, 2I], NeMo's layout already: renamed only), and
    # Kimi K3 unquantized has its experts K.weight in bf16, as NeMo's to_hf writes them. Both go to NeMo's
    # from_hf and back byte for byte; without recast.json the way back is NeMo's to_hf.
    case = next(c for c in CASES if c.adapter == family)
    src = plain_checkpoint(family)
    native = tmp_path / "native"
    assert api.convert(src, native, api.Options(to="native")).adapter == family
    source_sd, cfg = load_state_dict(src), config(src)
    assert_state_dicts_identical(load_state_dict(native), _nemo_adapter(case, cfg).from_hf(dict(source_sd)))
    api.convert(native, tmp_path / "back", api.Options(to="hf"))
    assert_state_dicts_identical(load_state_dict(tmp_path / "back"), source_sd)
    (native / SIDECAR).unlink()
    api.convert(native, tmp_path / "hf", api.Options(to="hf", quantize="none"))
    want = _nemo_adapter(case, cfg).to_hf(load_state_dict(native))
    assert_state_dicts_identical(load_state_dict(tmp_path / "hf"), want)


def test_ling_v2_bf16_release_equals_nemo_and_quantizes_afresh(
    nemo, plain_checkpoint, tmp_path: Path
) -> None:
    # Ling 2.0 ships bf16 only: the release's own dtype, the fused query_key_value split by NeMo's
    # from_hf, back byte for byte (the source's headers restored). Then a fresh block quantization of the
    # native checkpoint fuses q | k | v into one FP8 tensor with [⌈512/128⌉, ⌈160/128⌉] scales (verified
    # in flight within the e4m3 bound), and NeMo, after dequantize_from_fp8, loads that release exactly
    # as Recast does.
    case = next(c for c in CASES if c.adapter == "ling-v2")
    src = plain_checkpoint("ling-v2")
    native = tmp_path / "native"
    assert api.convert(src, native, api.Options(to="native")).adapter == "ling-v2"
    source_sd, cfg = load_state_dict(src), config(src)
    assert_state_dicts_identical(load_state_dict(native), _nemo_adapter(case, cfg).from_hf(dict(source_sd)))
    api.convert(native, tmp_path / "back", api.Options(to="hf"))
    assert_state_dicts_identical(load_state_dict(tmp_path / "back"), source_sd)
    for shard in sorted(src.glob("*.safetensors")):
        assert (tmp_path / "back" / shard.name).read_bytes() == shard.read_bytes()

    fp8 = tmp_path / "fp8"
    report = api.convert(native, fp8, api.Options(to="hf", quantize="block"))
    assert report.passed
    fp8_sd = load_state_dict(fp8)
    qkv = "model.layers.1.attention.query_key_value.weight"
    assert fp8_sd[qkv].dtype == torch.float8_e4m3fn and fp8_sd[qkv].shape == (512, 160)
    assert fp8_sd[qkv + "_scale_inv"].shape == (4, 2)
    again = tmp_path / "again"
    assert api.convert(fp8, again, api.Options(to="native")).passed
    want = _nemo_adapter(case, config(fp8)).from_hf(nemo_oracle.dequantize(fp8_sd, torch.bfloat16))
    assert_state_dicts_identical(load_state_dict(again), want)


def test_mimo_v25_pro_regroups_only_the_fp8_release(
    nemo, checkpoint, plain_checkpoint, tmp_path: Path
) -> None:
    # NeMo's MiMo-V2.5-Pro adapter regroups the shard-interleaved qkv_proj only where it is FP8 (the
    # release); a bf16 one, as its own to_hf writes it, is taken to be [Q | K | V] already and passed on.
    # Recast does the same, so both equal NeMo; the FP8 one's scales restart at each shard's 152 rows.
    case = next(c for c in CASES if c.adapter == "mimo-v2.5-pro")
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    release = checkpoint("mimo-v2.5-pro", scheme="block")
    fp8 = load_state_dict(release)
    assert fp8[qkv].shape == (304, 160) and fp8[qkv + "_scale_inv"].shape == (4, 2)  # a plain grid: [3, 2]
    # The FP8 release's native checkpoint written back in bf16 is in that order too, whatever the recorded
    # plan's interleaving, so NeMo (and Recast) read it back to the same native tensors.
    assert api.convert(release, tmp_path / "from-fp8", api.Options(to="native")).passed
    report = api.convert(tmp_path / "from-fp8", tmp_path / "bf16", api.Options(to="hf", quantize="none"))
    assert report.passed
    bf16, from_fp8 = load_state_dict(tmp_path / "bf16"), load_state_dict(tmp_path / "from-fp8")
    assert torch.equal(bf16[qkv], from_fp8[qkv])
    assert_state_dicts_identical(_nemo_adapter(case, config(release)).from_hf(dict(bf16)), from_fp8)
    assert api.verify(tmp_path / "from-fp8", tmp_path / "bf16").passed
    # Re-encoding the release in place would leave that tensor in its shard order: refused, nothing written.
    with pytest.raises(
        RecastError, match=r"qkv_proj\.weight' is saved as 2 tensor-parallel shards .*--to native"
    ):
        api.convert(release, tmp_path / "in-place", api.Options(to="hf", quantize="none"))
    assert not (tmp_path / "in-place").exists() or not any((tmp_path / "in-place").iterdir())
    assert api.convert(release, tmp_path / "kept", api.Options(to="hf", quantize="keep")).passed
    src = plain_checkpoint("mimo-v2.5-pro")
    native = tmp_path / "native"
    assert api.convert(src, native, api.Options(to="native")).adapter == "mimo-v2.5-pro"
    source_sd, cfg = load_state_dict(src), config(src)
    got = load_state_dict(native)
    assert_state_dicts_identical(got, _nemo_adapter(case, cfg).from_hf(dict(source_sd)))
    assert torch.equal(got[qkv], source_sd[qkv])
    # A fresh block quantization leaves qkv_proj in bf16: one grid over the whole tensor is not the
    # per-shard grid MiMo's loaders read.
    report = api.convert(native, tmp_path / "fp8", api.Options(to="hf", quantize="block"))
    assert report.passed
    fresh = load_state_dict(tmp_path / "fp8")
    assert fresh[qkv].dtype == torch.bfloat16 and qkv + "_scale_inv" not in fresh
    assert fresh["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float8_e4m3fn


def test_mimo_v2_reads_its_shard_count_from_the_index(
    nemo, checkpoint, plain_checkpoint, tmp_path: Path
) -> None:
    # MiMo-V2.5 as MiMoV2ForCausalLM: NeMo's MiMo-V2-Flash adapter takes the shard count of the fused
    # qkv_proj from the index's metadata.tp_size and regroups a bf16 one too; so does Recast. An hf output
    # carries tp_size in its index (written afresh, here in bf16), so NeMo reads it back the same.
    case = next(c for c in CASES if c.adapter == "mimo-v2")
    for name, src in (("bf16", plain_checkpoint("mimo-v2")), ("fp8", checkpoint("mimo-v2", scheme="block"))):
        native = tmp_path / f"native-{name}"
        assert api.convert(src, native, api.Options(to="native")).adapter == "mimo-v2"
        cfg = {**config(src), "name_or_path": str(src)}
        got = load_state_dict(native)
        want = _nemo_native(case, load_state_dict(src), cfg)
        assert_state_dicts_identical(got, want)
    out = tmp_path / "bf16-out"
    assert api.convert(native, out, api.Options(to="hf", quantize="none")).passed
    assert json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["tp_size"] == 2
    again = _nemo_native(case, load_state_dict(out), {**config(out), "name_or_path": str(out)})
    assert_state_dicts_identical(again, got)
    # without tp_size the same fused tensor splits as one shard: different q/k/v
    q = "model.layers.0.self_attn.q_proj.weight"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    (out / "model.safetensors.index.json").write_text(json.dumps({**index, "metadata": {}}))
    assert not torch.equal(
        _nemo_native(case, load_state_dict(out), {**config(out), "name_or_path": str(out)})[q], got[q]
    )


def test_nemo_qwen3_5_moe_dequantizes_only_the_experts(nemo, checkpoint) -> None:
    # Why the Qwen3.5-MoE case dequantizes the other weights first: NeMo's from_hf drops their scales.
    src = checkpoint("qwen3.5-moe", scheme="block")
    got = nemo_oracle.moe_adapter(_QWEN3_5, config(src), torch.bfloat16).from_hf(load_state_dict(src))
    assert got["model.language_model.layers.1.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert got["model.language_model.layers.1.mlp.experts.down_projs"].dtype == torch.bfloat16
    assert not [k for k in got if k.endswith("_scale_inv")]


def test_glm5_next_keeps_the_mtp_layer_nemo_drops(nemo, checkpoint, tmp_path: Path) -> None:
    # NeMo's from_hf drops layers.{num_hidden_layers} (the MTP layer of GLM-5.3-Flash releases), which no
    # reversible conversion can do: Recast keeps it, renamed like the other layers, and equals NeMo elsewhere.
    src = tmp_path / "src"
    shutil.copytree(checkpoint("glm5-next", scheme="block"), src)
    sd, cfg = load_state_dict(src), config(src)
    layers = cfg["text_config"]["num_hidden_layers"]
    last, mtp = f".layers.{layers - 1}.", f".layers.{layers}."
    extra = {k.replace(last, mtp): t for k, t in sd.items() if last in k}
    save_file(extra, str(src / "mtp.safetensors"))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(extra, "mtp.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps(index))

    report = api.convert(src, tmp_path / "native", api.Options(to="native"))
    assert report.passed
    got = load_state_dict(tmp_path / "native")
    want = _nemo_native(next(c for c in CASES if c.family == "glm5-next"), load_state_dict(src), cfg)
    kept = sorted(set(got) - set(want))
    assert kept and all(mtp in k for k in kept) and not set(want) - set(got)
    assert_state_dicts_identical({k: got[k] for k in want}, want)
    api.convert(tmp_path / "native", tmp_path / "back", api.Options(to="hf"))
    assert_state_dicts_identical(load_state_dict(tmp_path / "back"), load_state_dict(src))


def test_nemo_qwen3_vl_moe_drops_the_scales(nemo, checkpoint) -> None:
    src = checkpoint("qwen3-vl-moe", scheme="block")
    spec = "qwen3_vl_moe.Qwen3VLMoeStateDictAdapter"
    got = nemo_oracle.moe_adapter(spec, config(src), torch.bfloat16).from_hf(load_state_dict(src))
    assert not [k for k in got if k.endswith("_scale_inv")]
    assert got["model.language_model.layers.1.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
