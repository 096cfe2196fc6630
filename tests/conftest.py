"""Shared fixtures: real checkpoints written by transformers' model classes, built once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoints import build_checkpoint, build_compressed_tensors, build_plain

pytest_plugins = ["servers"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``checkpoint(family, scheme=..., layout=..., tied=...)``: a cached vendor-style FP8 checkpoint."""
    cache: dict[tuple, Path] = {}

    def get(family: str, scheme: str = "per-tensor", layout: str = "default", tied: bool = False) -> Path:
        key = ("fp8", family, scheme, layout, tied)
        if key not in cache:
            dst = tmp_path_factory.mktemp(f"{family}-{scheme}-{layout}-{'tied' if tied else 'untied'}")
            cache[key] = build_checkpoint(dst / "ckpt", family, scheme=scheme, layout=layout, tied=tied)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def plain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_plain(tmp_path_factory.mktemp(f"plain-{family}") / "ckpt", family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def ct_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``ct_checkpoint(family, scheme=..., zero_points=...)``: the same model in compressed-tensors form."""
    cache: dict[tuple, Path] = {}

    def get(family: str, scheme: str = "per-tensor", zero_points: bool = False) -> Path:
        key = (family, scheme, zero_points)
        if key not in cache:
            dst = tmp_path_factory.mktemp(f"ct-{family}-{scheme}{'-zp' if zero_points else ''}")
            cache[key] = build_compressed_tensors(
                dst / "ckpt", family, scheme=scheme, zero_points=zero_points
            )
        return cache[key]

    return get
