"""The `recast` command-line contract other tools depend on."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest
from terminal import run_in_terminal

from worker.cli import build_parser, main


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_inspect_describes_source_and_conversion(checkpoint, capsys) -> None:
    src = checkpoint("mistral4-vlm", scheme="per-tensor")
    assert main(["inspect", str(src), "--json"]) == 0
    info = _json(capsys)
    assert info["adapter"] == "mistral4-vlm" and info["format"] == "hf"
    assert info["quantization"]["schemes"] == ["per-tensor"]
    assert info["quantization"]["activation_scheme"] == "static"
    assert info["shards"] == 3 and info["tensors"] > 50 and info["bytes"] > 0
    conv = info["conversion"]
    assert conv["to"] == "native" and conv["output_bytes"] > info["bytes"] * 1.3
    assert conv["peak_host_memory_bytes"] > 0 and conv["disk_bytes_needed"] >= conv["output_bytes"]
    assert "tokenizer.json" in info["carried_files"]


@pytest.mark.parametrize(
    "family,scheme,layout,adapter,expected_layout",
    [
        ("deepseek-v3", "block", "default", "deepseek-v3", "default"),
        ("mistral4", "per-expert", "prefixed", "mistral4", "default"),
        ("mistral3-fp8", "per-tensor", "identity", "mistral3-fp8", "identity"),
        ("mistral3-fp8", "per-tensor", "default", "mistral3-fp8", "vlm_full"),
        ("qwen3-moe", "block", "default", "qwen3-moe", "default"),
    ],
)
def test_inspect_detects_adapter_and_scheme(
    family, scheme, layout, adapter, expected_layout, checkpoint, capsys
):
    assert main(["inspect", str(checkpoint(family, scheme=scheme, layout=layout)), "--json"]) == 0
    info = _json(capsys)
    assert info["adapter"] == adapter and info["layout"] == expected_layout
    assert scheme in info["quantization"]["schemes"]
    assert info["detection"].startswith("architectures ")


def test_inspect_lists_the_families_and_their_detection_rules(capsys) -> None:
    assert main(["inspect", "--adapters", "--json"]) == 0
    families = {f["name"]: f for f in _json(capsys)}
    new = {"qwen3-moe", "glm4-moe", "kimi-k2", "deepseek-v32", "minimax-m2", "llama", "qwen3"}
    assert new <= set(families)
    kimi = families["kimi-k2"]
    assert kimi["architectures"] == ["DeepseekV3ForCausalLM"] and kimi["model_types"] == ["kimi_k2"]
    assert "model_type kimi_k2" in kimi["detection"]
    assert families["minimax-m2"]["expert_keys"][0] == "block_sparse_moe.experts.{e}.{w1,w3}.weight"
    assert main(["inspect", "--adapters"]) == 0
    assert "detected by architectures Qwen3MoeForCausalLM" in capsys.readouterr().out
    assert main(["inspect"]) == 2 and "--adapters" in capsys.readouterr().err


def test_convert_json_report_and_verify(checkpoint, tmp_path: Path, capsys) -> None:
    src = checkpoint("deepseek-v3", scheme="block")
    dst = tmp_path / "native"
    assert main(["convert", str(src), str(dst), "--to", "native", "--device", "cpu", "--json"]) == 0
    report = _json(capsys)
    s = report["summary"]
    assert s["passed"] and s["tensors_checked"] == s["bitwise_equal"] > 0
    assert s["accounting"]["unaccounted"] == 0 and s["accounting"]["scales"] > 0
    assert report["bytes_in"] > 0 and report["bytes_out"] > 0 and report["seconds"] > 0
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in report["accounting"]["mapped"]
    assert main(["verify", str(src), str(dst), "--json"]) == 0
    assert _json(capsys)["summary"]["passed"]
    assert main(["convert", str(dst), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_adapter_override(checkpoint, tmp_path: Path, capsys) -> None:
    src = checkpoint("mistral3-fp8", scheme="per-tensor", layout="causal")
    code = main(["convert", str(src), str(tmp_path / "n"), "--to", "native", "--adapter", "nonsense"])
    assert code == 2 and "unknown adapter 'nonsense'" in capsys.readouterr().err
    assert (
        main(["convert", str(src), str(tmp_path / "n"), "--to", "native", "--adapter", "mistral3-fp8"]) == 0
    )


def test_no_verify_skips_the_check(checkpoint, tmp_path: Path, capsys) -> None:
    src = checkpoint("mistral4", scheme="per-tensor")
    assert main(["convert", str(src), str(tmp_path / "n"), "--to", "native", "--no-verify", "--json"]) == 0
    assert _json(capsys)["summary"]["verified"] is False


def test_console_script_is_installed() -> None:
    proc = subprocess.run(["recast", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "inspect" in proc.stdout and "convert" in proc.stdout


def test_progress_is_one_log_line_per_shard_off_a_terminal(checkpoint, tmp_path: Path, capsys) -> None:
    src = checkpoint("mistral4", scheme="per-tensor")
    dst = tmp_path / "native"
    assert main(["convert", str(src), str(dst), "--to", "native", "--device", "cpu", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["summary"]["passed"]
    lines = [line for line in err.splitlines() if line.startswith("recast: ")]  # not the fixture's tqdm
    shards = sorted(p.name for p in dst.glob("*.safetensors") if p.name.startswith("model-"))
    assert sorted(line.split()[2] for line in lines) == shards, err
    assert all(line.startswith("recast: converted model-") for line in lines)
    assert f"{len(shards)}/{len(shards)} shards" in err and "(100%)" in err and "MB/s" in err
    assert main(["verify", str(src), str(dst)]) == 0
    err = capsys.readouterr().err
    for shard in shards:
        assert f"recast: verified {shard} (" in err


def test_progress_bars_at_a_terminal(checkpoint, tmp_path: Path) -> None:
    """In a pseudo-terminal, rich draws the bars (bytes, throughput) and no log line is printed."""
    src = checkpoint("mistral4", scheme="per-tensor")
    code, screen = run_in_terminal(
        ["convert", str(src), str(tmp_path / "n"), "--to", "native", "--device", "cpu"]
    )
    assert code == 0 and "converting " in screen and "(3/3 shards)" in screen and "MiB" in screen, screen
    assert "recast: converted" not in screen and "PASSED" in screen
    code, screen = run_in_terminal(["verify", str(src), str(tmp_path / "n")])
    assert code == 0 and "verifying n (4/4 shards)" in screen, screen


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name) and sub.description, (
                    f"recast {' '.join((*path, name))}: no description"
                )
                yield from _parsers(sub, (*path, name))


def test_help_describes_every_command_and_option_with_its_default(capsys) -> None:
    commands = list(_parsers(build_parser()))
    assert {" ".join(p) for p, _ in commands} >= {"convert", "verify", "inspect", "jobs submit", "jobs watch"}
    for path, parser in commands:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            where = f"recast {' '.join(path)} {action.option_strings or action.dest}"
            assert action.help and "\n" not in action.help, f"{where}: no one-line description"
            if action.option_strings and action.nargs != 0 and not action.required:
                shown = parser.formatter_class("recast")._get_help_string(action)
                assert "(default" in shown, f"{where}: its default is not shown"
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the dtype dequantized weights are written in (default: bf16)" in text
    assert (
        "--device {auto,cpu,cuda} where the arithmetic runs; auto: CUDA when one is visible (default: auto)"
        in text
    )
    assert (
        "Exit codes: 0 verified" in text and "(default: None)" not in text and "(default: False)" not in text
    )
