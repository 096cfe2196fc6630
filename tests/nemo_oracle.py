"""NeMo AutoModel 0.7.0's own state-dict adapters, as the oracle the engine's native output must equal.

Why not a test extra in pyproject.toml: nemo-automodel 0.7.0 requires ``transformers==5.18.0`` (we test
against transformers >=5,<6, 5.24 today) and training stacks (megatron-fsdp, torchao, quack-kernels,
mistral-common, datasets, …). A PEP 508 requirement cannot say "without its dependencies", and pip
offers ``--no-deps`` only for a whole install, not per requirement in pyproject or a requirements file:
listed in ``.[test]`` it would downgrade transformers and pull gigabytes. Its state-dict adapters need
only torch and transformers, and import cleanly from the bare wheel.

So ``load()`` takes, in order: an ``nemo_automodel`` 0.7.0 already importable; the wheel unpacked in the
cache (``$RECAST_NEMO_CACHE``, default ``~/.cache/recast``); the wheel file ``$RECAST_NEMO_WHEEL``
(offline machines); else ``python -m pip download nemo-automodel==0.7.0 --no-deps --only-binary=:all:``
once (pip's own index configuration applies, so CI reaches PyPI or its mirror). The wheel's SHA-256 is
checked against the pinned one before it is unpacked; nothing is installed, the unpacked directory is
put on ``sys.path`` for the test session. A failure says what to do rather than skipping, so a CI run
cannot pass without the oracle.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

VERSION = "0.7.0"
WHEEL = f"nemo_automodel-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "37b8397a73c17e4a8bffd0cd3becc0507abecc1ebfea3b3eb6468eed57ba6674"
_MODELS = "nemo_automodel.components.models"


def _cache_dir() -> Path:
    root = Path(os.environ.get("RECAST_NEMO_CACHE") or Path.home() / ".cache" / "recast")
    return root / f"nemo-automodel-{VERSION}"


def _installed_version() -> str | None:
    if importlib.util.find_spec("nemo_automodel") is None:
        return None
    return importlib.import_module("nemo_automodel").__version__


def _wheel(workdir: Path) -> Path:
    """The wheel file: ``$RECAST_NEMO_WHEEL`` or one ``pip download`` without dependencies."""
    given = os.environ.get("RECAST_NEMO_WHEEL")
    if given:
        return Path(given)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
    cmd += ["-d", str(workdir), f"nemo-automodel=={VERSION}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(
            f"could not download the NeMo AutoModel {VERSION} wheel ({done.stderr.strip()[-300:]}); "
            f"set RECAST_NEMO_WHEEL to a local {WHEEL} or unpack it into {_cache_dir()}"
        )
    return workdir / WHEEL


def load() -> Path | None:
    """Make ``nemo_automodel`` 0.7.0 importable; returns the unpacked directory put on sys.path, if any."""
    installed = _installed_version()
    if installed == VERSION:
        return None
    if installed is not None:
        raise RuntimeError(f"nemo_automodel {installed} is installed; the oracle is {VERSION}: uninstall it")
    target = _cache_dir()
    if not (target / "nemo_automodel" / "__init__.py").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            wheel = _wheel(Path(tmp))
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if digest != WHEEL_SHA256:
                raise RuntimeError(f"{wheel} has SHA-256 {digest}, not the pinned {WHEEL_SHA256}")
            unpacked = Path(tmp) / "unpacked"
            with zipfile.ZipFile(wheel) as z:
                z.extractall(unpacked)
            shutil.rmtree(target, ignore_errors=True)
            unpacked.rename(target)  # atomic: a half-unpacked cache is never seen
    sys.path.insert(0, str(target))
    return target


def adapter_class(spec: str) -> type:
    """``"qwen3_moe.Qwen3MoeStateDictAdapter"`` → that class from NeMo's state_dict_adapter module."""
    module, name = spec.rsplit(".", 1)
    return getattr(importlib.import_module(f"{_MODELS}.{module}.state_dict_adapter"), name)


# hf configs that only NeMo defines (its registry's _CUSTOM_CONFIG_REGISTRATIONS: the releases ship them
# as remote code): model_type -> ``module.Class`` under nemo_automodel.components.models.
NEMO_CONFIGS = {
    "bailing_moe": "ling_v2.config.BailingMoeV2Config",
    "mimo_v2": "mimo_v25.config.MiMoV2Config",
    "deepseek_v41": "deepseek_v41.config.DeepseekV41Config",
    "deepseek_v41_text": "deepseek_v41.config.DeepseekV41TextConfig",
    "kimi_k3": "kimi_k3.config.KimiK3Config",
}


def moe_config(config: dict[str, Any], dtype: torch.dtype) -> Any:
    """The ``MoEConfig`` NeMo's model would build from this hf config (its ``text_config`` for a VLM); the
    adapters read the expert count, the expert width (to split ``gate_and_up_projs``) and the activation."""
    from nemo_automodel.components.moe.config import MoEConfig

    config = config.get("text_config") or (config.get("thinker_config") or {}).get("text_config") or config
    experts = next(
        config[k]
        for k in ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
        if k in config
    )
    return MoEConfig(
        n_routed_experts=experts,
        n_shared_experts=config.get("n_shared_experts") or 0,
        # ERNIE spells it moe_k, Kimi Linear num_experts_per_token
        n_activated_experts=next(
            config[k] for k in ("num_experts_per_tok", "moe_k", "num_experts_per_token") if k in config
        ),
        n_expert_groups=1,
        n_limited_groups=1,
        train_gate=False,
        gate_bias_update_factor=0.0,
        aux_loss_coeff=0.0,
        score_func="sigmoid",
        route_scale=1.0,
        dim=config["hidden_size"],
        inter_dim=config.get("intermediate_size") or config["moe_intermediate_size"],
        moe_inter_dim=config.get("moe_intermediate_size") or config["intermediate_size"],
        norm_topk_prob=True,
        dtype=dtype,
        # Nemotron-H's experts are ReLU² (up_proj only): NeMo's merge reads the gating from this
        expert_activation="relu2" if config.get("mlp_hidden_act") == "relu2" else "swiglu",
    )


def moe_adapter(
    spec: str,
    config: dict[str, Any],
    dtype: torch.dtype,
    backend: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """NeMo's MoE adapter ``spec`` as its model class builds it: (hf config, MoEConfig, backend, dtype,
    and the class's own ``kwargs``); ``backend`` sets BackendConfig fields where the layout depends on them.

    The hf config class is the architecture's, or where transformers has no such class (Step-3.5) the
    one registered for the config's ``model_type``, or NeMo's own (Ling 2.0: ``NEMO_CONFIGS``)."""
    import transformers
    from nemo_automodel.components.models.common import BackendConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_class = getattr(transformers, config["architectures"][0], None)
    if model_class:
        config_class = model_class.config_class
    elif config["model_type"] in NEMO_CONFIGS:
        module, name = NEMO_CONFIGS[config["model_type"]].rsplit(".", 1)
        config_class = getattr(importlib.import_module(f"{_MODELS}.{module}"), name)
    else:
        config_class = CONFIG_MAPPING[config["model_type"]]
    hf_config = config_class.from_dict(config)
    return adapter_class(spec)(
        hf_config, moe_config(config, dtype), BackendConfig(**(backend or {})), dtype=dtype, **kwargs
    )


def dequantize(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every ``*_scale_inv`` pair dequantized by NeMo's DeepSeek-V3 ``dequantize_from_fp8`` (the FP8 step
    of every NeMo adapter that has one), scales dropped: what NeMo feeds adapters that load only bf16.

    That function is 2-D; an aggregated 3-D expert tensor with ``[E, rows/128, cols/128]`` block scales
    (Step-3.5) goes through it one expert at a time, which is what those scales mean."""
    from nemo_automodel.components.models.deepseek_v3.state_dict_adapter import dequantize_from_fp8

    def one(t: torch.Tensor, scale: torch.Tensor, key: str) -> torch.Tensor:
        if t.dim() == 3 and scale.dim() == 3:
            return torch.stack(
                [dequantize_from_fp8(t[e], scale[e], dtype=dtype, name=key) for e in range(len(t))]
            )
        return dequantize_from_fp8(t, scale, dtype=dtype, name=key)

    out = {}
    for key, t in sd.items():
        if key.endswith("_scale_inv"):
            continue
        scale = sd.get(key + "_scale_inv")
        out[key] = t if scale is None else one(t, scale, key)
    return out
