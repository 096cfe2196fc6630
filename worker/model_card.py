"""The model card (README.md) a job publishes with a Hub target, so the repo page says what it was
converted from, how, and how it was checked.

The front matter is the Hub's own metadata (``huggingface_hub.ModelCardData``): ``base_model`` names the
source repo when the source is on the Hub, and ``base_model_relation: quantized`` where the output holds
FP8 weights made from a source that held none (the Hub reads the relation from this field; without it,
it guesses). The body gives the source's pinned commit, the conversion, the verification summary and the
SHA-256 manifest. The card is written after the manifest and is the one published file it does not
cover. A README.md the source carried (its own card) is kept below ours, under "Original model card",
rather than published as if it described the converted checkpoint.

The card is Hub metadata, so it lives here, beside the job step that publishes, and not in the engine.
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from worker.engine.qformat import describe, quantization_config_of
from worker.stores import Location

CARD = "README.md"


def card_plan(target: object, meta: Path, names: list[str], overwrite: bool) -> dict[str, Any] | None:
    """For a Hub target, whether to publish a model card (``write``: not over a README.md the repo holds,
    unless the conversion may overwrite), and the README.md the source carried (``original``), taken out
    of ``names``: on the Hub it would pass for a card of the converted checkpoint. None for other targets.
    """
    hub = sys.modules.get("worker.stores.hub")  # not imported yet: the target is not the Hub's
    if hub is None or not isinstance(target, hub.HubTarget):
        return None
    original = None
    if CARD in names:
        original = (meta / CARD).read_text(errors="replace")
        names.remove(CARD)
    return {"write": overwrite or not target.holds(CARD), "original": original}


def quantized_from_unquantized(source_config: dict[str, Any] | None, output_config: dict[str, Any]) -> bool:
    """The Hub's ``quantized`` relation: FP8 weights out, none in (a native source holds none)."""
    return quantization_config_of(output_config) is not None and quantization_config_of(source_config) is None


def render(
    *,
    source: Location,
    source_revision: str | None,
    target_repo: str,
    hub_endpoint: str,
    report: dict[str, Any],
    source_config: dict[str, Any] | None,
    output_config: dict[str, Any],
    manifest: str,
    job_id: str,
    original: str | None = None,
    output_keys: Collection[str] = (),
) -> str:
    """The card's text. ``report`` is the job's verification report (``Report.to_json``), ``manifest``
    the SHA256SUMS it published, ``original`` the README.md the source carried, if any; ``output_keys``
    the tensors written, whose scale spelling tells formats that share a ``quant_method`` apart."""
    on_hub = source.scheme == "hf"
    relation = quantized_from_unquantized(source_config, output_config)
    output_format = report["direction"].split("->")[-1]
    tags = ["recast", "fp8" if quantization_config_of(output_config) else output_format]
    data = ModelCardData(
        base_model=source.root if on_hub else None,
        base_model_relation="quantized" if on_hub and relation else None,
        library_name="transformers" if output_format == "hf" else None,
        tags=tags,
    )
    opts = report.get("options") or {}
    checked = ", and verified against it" if (report.get("summary") or {}).get("verified") else ""
    if on_hub:
        where = f"[{source.root}]({hub_endpoint}/{source.root})"
        if source_revision:
            where += f" at commit [`{source_revision}`]({hub_endpoint}/{source.root}/tree/{source_revision})"
    else:
        where = f"`{source.url}`"
    lines = [
        f"# {target_repo.rsplit('/', 1)[-1]}",
        "",
        f"Converted by Recast from {where}{checked} (job `{job_id}`).",
        "",
        "## Conversion",
        "",
        "| | |",
        "| --- | --- |",
        f"| adapter | `{report['adapter']}` |",
        f"| direction | {report['direction'].replace('->', ' → ')} |",
        f"| dtype | {_dtype(opts, output_config)} |",
        f"| scheme | {_scheme(output_config, output_keys)} |",
        f"| format | {_format(output_format, output_config, output_keys)} |",
        "",
        "## Verification",
        "",
        *_verification(report),
        "",
        "## Files (SHA-256)",
        "",
        "Every published file but this card, as in `SHA256SUMS` (check a download with `sha256sum -c "
        "SHA256SUMS`); `recast.json` records the same hashes with the full conversion options.",
        "",
        "```text",
        manifest.rstrip("\n"),
        "```",
    ]
    if original is not None and (text := ModelCard(original).text.strip()):
        lines += ["", "## Original model card", "", text]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def _dtype(opts: dict[str, Any], output_config: dict[str, Any]) -> str:
    if quantization_config_of(output_config):
        return "quantized weights with their scales; other tensors as in the source"
    return f"{opts.get('dtype', 'bf16')} (dequantized weights; other tensors keep their dtype)"


def _scheme(output_config: dict[str, Any], keys: Collection[str]) -> str:
    groups = describe(output_config, keys)["groups"] if quantization_config_of(output_config) else []
    if not groups:
        return "none (not quantized)"
    parts = []
    for g in groups:
        weights = g["weights"]
        if g.get("block_structure"):
            weights += " " + "×".join(str(n) for n in g["block_structure"])
        parts.append(f"weights per {weights}, {g.get('input_activations') or 'unquantized'} activations")
    return "; ".join(parts)


def _format(output_format: str, output_config: dict[str, Any], keys: Collection[str]) -> str:
    if output_format == "native":
        return "NeMo AutoModel native layout (safetensors)"
    if quantization_config_of(output_config):
        return f"Hugging Face safetensors, `{describe(output_config, keys)['format']}` quantization"
    return "Hugging Face safetensors"


def _verification(report: dict[str, Any]) -> list[str]:
    s = report.get("summary") or {}
    if not s.get("verified"):
        return ["Not verified: the job was submitted with `verify: false`."]
    acc = s.get("accounting") or {}
    lines = [
        f"**{'Passed' if s.get('passed') else 'Failed'}**: every output tensor converted back and compared "
        "with the source.",
        "",
        f"- tensors checked: {s.get('tensors_checked', 0)}, bitwise equal: {s.get('bitwise_equal', 0)}",
    ]
    if s.get("bounded"):
        ratio = s.get("worst_bound_ratio")
        snr = s.get("min_snr_db")
        lines.append(
            f"- within the e4m3 error bound: {s.get('bounded_within', 0)} of {s['bounded']} (worst "
            f"{ratio * 100:.1f}% of the bound, min SNR {snr:.1f} dB)"
            if ratio is not None and snr is not None
            else f"- within the e4m3 error bound: {s.get('bounded_within', 0)} of {s['bounded']}"
        )
    lines.append("- source keys: " + ", ".join(f"{k} {v}" for k, v in acc.items() if k != "passthrough"))
    return lines
