"""Small comparison helpers shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from checkpoints import load_state_dict
from safetensors.torch import load_file, save_file


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def assert_state_dicts_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want), f"keys differ: {sorted(set(got) ^ set(want))[:10]}"
    bad = [k for k in want if not same_bits(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors that are listed in its index (the sidecar is not part of the model)."""
    return load_state_dict(path)


def config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def flip_bits(checkpoint_dir: Path, key: str, byte: int, mask: int) -> None:
    """XOR ``mask`` into byte ``byte`` of tensor ``key``'s data, in place in its shard."""
    index = json.loads((checkpoint_dir / "model.safetensors.index.json").read_text())
    shard = checkpoint_dir / index["weight_map"][key]
    data = bytearray(shard.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = 8 + header_len + json.loads(data[8 : 8 + header_len])[key]["data_offsets"][0]
    data[start + byte] ^= mask
    shard.write_bytes(bytes(data))


def replace_tensor(checkpoint_dir: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` where tensor ``key`` is, in its shard and in the index, in place: ``{key: t}`` changes
    it, other names stand instead of it (a weight stored as codes and scale), ``{}`` drops it."""
    index_path = checkpoint_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = index["weight_map"][key]
    saved = load_file(checkpoint_dir / name)
    del saved[key]
    saved.update({k: t.contiguous() for k, t in tensors.items()})
    save_file(saved, checkpoint_dir / name, metadata={"format": "pt"})
    index["weight_map"] = {
        k2: v for k, v in index["weight_map"].items() for k2 in (tensors if k == key else (k,))
    }
    index_path.write_text(json.dumps(index))
