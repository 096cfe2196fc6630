"""The engine writes exactly the bytes it wrote before the pipeline was rebuilt for speed.

``golden_sha256.json`` holds, for every conversion below, the SHA-256 of each weight file written (the
shards and the index) and of its source's. Configs are left out: transformers writes its own version
into them, and the weights are what the pipeline produces; the round-trip tests compare configs.
It was recorded from ``main`` before the streaming pipeline changed (issue 9). A source hash that no
longer matches means the fixture itself changed (say a new transformers release initialises the tiny
models differently): regenerate with ``RECAST_WRITE_GOLDEN=1 pytest tests/test_golden_bytes.py`` on a
commit whose engine is known good, and say so in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from worker.engine import api
from worker.engine.checkpoint import INDEX

GOLDEN = Path(__file__).with_name("golden_sha256.json")
WRITE = os.environ.get("RECAST_WRITE_GOLDEN") == "1"

# (name, fixture kind, fixture args, chain of (to, options) steps, each converting the previous output)
CASES = [
    *(
        (f"{fam}-{scheme}-{layout}-{'tied' if tied else 'untied'}", "fp8", (fam, scheme, layout, tied),
         [("native", {}), ("hf", {})])
        for fam, scheme, layout, tied in [
            ("mistral4", "per-tensor", "default", False),
            ("mistral4", "per-expert", "prefixed", True),
            ("mistral4", "block", "default", False),
            ("mistral4-vlm", "per-expert", "default", True),
            ("mistral4-vlm", "block", "default", False),
            ("mistral3-fp8", "per-tensor", "default", True),
            ("mistral3-fp8", "per-tensor", "identity", False),
            ("mistral3-fp8", "per-tensor", "causal", False),
            ("deepseek-v3", "block", "default", False),
            ("deepseek-v3", "per-tensor", "default", True),
        ]
    ),
    ("vlm-block-fp32", "fp8", ("mistral4-vlm", "block", "default", False), [("native", {"dtype": "fp32"})]),
    ("vlm-block-fp16", "fp8", ("mistral4-vlm", "block", "default", False), [("native", {"dtype": "fp16"})]),
    ("deepseek-dequantize-hf", "fp8", ("deepseek-v3", "block", "default", False), [("hf", {"quantize": "none"})]),
    ("deepseek-requantize-hf", "fp8", ("deepseek-v3", "block", "default", False),
     [("hf", {"quantize": "per-tensor"})]),
    *(
        (f"plain-{fam}-{mode}", "plain", (fam,), [("hf", {"quantize": mode}), ("native", {}), ("hf", {})])
        for fam in ("deepseek-v3", "mistral3-fp8")
        for mode in ("per-tensor", "block")
    ),
]  # fmt: skip
# Fresh scales on Mistral 4's 3-D experts are refused (tests/test_consumers.py): the cases that pinned
# them (mistral4-native-to-block, plain-mistral4-per-tensor, plain-mistral4-block) are gone.


def _hashes(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and (p.suffix == ".safetensors" or p.name == INDEX)
    }


@pytest.fixture(scope="module")
def recorded() -> dict:
    data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    yield data
    if WRITE:
        GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_output_bytes_are_unchanged(case, recorded, checkpoint, plain_checkpoint, tmp_path: Path) -> None:
    name, kind, args, chain = case
    src = (
        checkpoint(*args[:1], scheme=args[1], layout=args[2], tied=args[3])
        if kind == "fp8"
        else (plain_checkpoint(*args))
    )
    got = {"source": _hashes(src), "steps": []}
    previous = src
    for i, (to, options) in enumerate(chain):
        out = tmp_path / f"step{i}"
        assert api.convert(previous, out, api.Options(to=to, **options)).passed
        got["steps"].append(_hashes(out))
        previous = out
    if WRITE:
        recorded[name] = got
        return
    assert name in recorded, f"no golden hashes for {name}; record them with RECAST_WRITE_GOLDEN=1"
    want = recorded[name]
    assert got["source"] == want["source"], f"the {name} fixture changed; its golden hashes are stale"
    for i, (step, expected) in enumerate(zip(got["steps"], want["steps"], strict=True)):
        differ = sorted(k for k in expected.keys() | step.keys() if step.get(k) != expected.get(k))
        assert not differ, f"{name} step {i} ({chain[i][0]}): these files changed: {differ}"
