"""Paths that would take a job outside ``RECAST_FILE_ROOTS``, refused end to end.

Each checkpoint here is a working one with one thing changed: a shard or a directory swapped for a
symlink to a copy outside the root, or the index naming a shard by an absolute path, by ``..``, by
percent-encoded dots, or with a control character. The engine (and the CLI) refuse each with a
``CheckpointError`` that names the file; the API refuses each at submission with a 422 naming the field,
and a job whose carried file is such a symlink fails on the worker with the engine's error. Locations
that escape (``..``, ``%2e%2e``, a symlinked directory, control characters) and ``s3://`` and ``hf://``
names that break their store's rules are refused before anything is read. A target whose staging
directory or parent turns into a symlink after submission is not written through.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Service, submit, wait

from worker.cli import main
from worker.engine import api
from worker.engine.checkpoint import INDEX, open_checkpoint
from worker.engine.errors import CheckpointError, RecastError
from worker.engine.storage import LocalSource
from worker.stores import StoreSettings, open_target, parse_location

SHARD = "model-00001-of-00003.safetensors"


@dataclass(frozen=True)
class Tree:
    root: Path  # the only file root
    outside: Path  # beside it, holding what the symlinks and names reach for
    good: Path  # an untouched checkpoint under the root

    def fingerprint(self) -> list[tuple[str, int]]:
        """What lies outside the root, to show that nothing was written there."""
        return sorted((str(p), p.lstat().st_size) for p in self.outside.rglob("*"))


def _index_names(name: Callable[[Path], str]) -> Callable[[Path, Path], None]:
    """The index names shard 1 as ``name(copy outside)``, where a real copy of it lies."""

    def spoil(ckpt: Path, outside: Path) -> None:
        shutil.copy(ckpt / SHARD, outside / SHARD)
        _rename_in_index(ckpt, name(outside / SHARD))

    return spoil


def _rename_in_index(ckpt: Path, new: str) -> None:
    index = json.loads((ckpt / INDEX).read_text())
    index["weight_map"] = {k: new if v == SHARD else v for k, v in index["weight_map"].items()}
    (ckpt / INDEX).write_text(json.dumps(index))


def _shard_symlink(ckpt: Path, outside: Path) -> None:
    (ckpt / SHARD).rename(outside / SHARD)
    (ckpt / SHARD).symlink_to(outside / SHARD)


def _dir_symlink(ckpt: Path, outside: Path) -> None:
    (outside / "shards").mkdir()
    shutil.copy(ckpt / SHARD, outside / "shards" / SHARD)
    (ckpt / "sub").symlink_to(outside / "shards")
    _rename_in_index(ckpt, f"sub/{SHARD}")


def _carried_symlink(ckpt: Path, outside: Path) -> None:
    (outside / "secret.json").write_text('{"secret": "outside the root"}')
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.json").symlink_to(outside / "secret.json")


# name: (how the checkpoint is spoiled, what the error says, the file it names)
CASES: dict[str, tuple[Callable[[Path, Path], None], str, str]] = {
    "shard-symlink": (_shard_symlink, "leads outside the checkpoint directory through a symlink", SHARD),
    "dir-symlink": (_dir_symlink, "leads outside the checkpoint directory through a symlink", f"sub/{SHARD}"),
    "index-absolute": (_index_names(str), "points outside", f"/outside/index-absolute/{SHARD}"),
    "index-dotdot": (
        _index_names(lambda p: f"../../outside/{p.parent.name}/{SHARD}"),
        "points outside",
        f"'../../outside/index-dotdot/{SHARD}'",
    ),
    "index-encoded-dots": (
        _index_names(lambda p: f"%2e%2e/%2E%2E/outside/{p.parent.name}/{SHARD}"),
        "points outside",
        "'%2e%2e/%2E%2E/outside/",
    ),
    "index-control": (
        lambda c, o: _rename_in_index(c, f"model\x00{SHARD}"),
        "control characters",
        "model\\x00",
    ),
}
CARRIED = "carried-symlink"  # read only when the conversion copies it: the worker's refusal, not submit's


@pytest.fixture(scope="module")
def tree(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Tree:
    base = tmp_path_factory.mktemp("paths")
    t = Tree(base / "root", base / "outside", base / "root" / "good")
    t.root.mkdir()
    shutil.copytree(checkpoint("mistral4"), t.good)
    for name, (spoil, _, _) in {**CASES, CARRIED: (_carried_symlink, "", "")}.items():
        (t.outside / name).mkdir(parents=True)
        shutil.copytree(t.good, t.root / name)
        spoil(t.root / name, t.outside / name)
    (t.root / "escape").symlink_to(t.outside / "shard-symlink")  # a directory outside the root
    (t.root / "escape-out").symlink_to(t.outside, target_is_directory=True)
    (t.root / "alias").symlink_to(t.good)  # a symlink that stays under the root is fine
    return t


# ---------------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize("case", CASES)
def test_engine_refuses_and_names_the_file(tree: Tree, case: str, tmp_path: Path) -> None:
    _, says, names = CASES[case]
    with pytest.raises(CheckpointError, match=says) as info:
        api.convert(tree.root / case, tmp_path / "out", api.Options(to="native", device="cpu"))
    assert names in str(info.value)
    assert not (tmp_path / "out").exists()


def test_engine_refuses_a_carried_file_that_leads_outside(tree: Tree, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"'tokenizer\.json' leads outside the checkpoint directory"):
        api.convert(tree.root / CARRIED, tmp_path / "out", api.Options(to="native", device="cpu"))
    assert not (tmp_path / "out").exists()


def test_cli_refuses_with_the_engines_error(tree: Tree, tmp_path: Path, capsys) -> None:
    assert main(["convert", str(tree.root / "shard-symlink"), str(tmp_path / "out"), "--to", "native"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recast: error: ") and f"'{SHARD}' leads outside the checkpoint directory" in err


def test_symlinks_inside_the_checkpoint_are_followed(tree: Tree, tmp_path: Path) -> None:
    """A store laid out like the Hub's cache (shards as symlinks to blobs beside them) still reads."""
    ckpt = tmp_path / "cache-like"
    shutil.copytree(tree.good, ckpt)
    (ckpt / "blobs").mkdir()
    (ckpt / SHARD).rename(ckpt / "blobs" / "0123abcd")
    (ckpt / SHARD).symlink_to(Path("blobs") / "0123abcd")
    assert SHARD in open_checkpoint(LocalSource(ckpt)).shards


# ------------------------------------------------------------------------------------------- locations


def bad_locations(t: Tree) -> list[tuple[str, str, str]]:
    """(field, URL, what the refusal says) for locations refused before any store is asked."""
    return [
        ("source", f"file://{t.good}/../../outside/shard-symlink", "must not contain '..' segments"),
        ("source", f"file://{t.root}/%2e%2e/outside/shard-symlink", "must not contain '..' segments"),
        ("target", f"file://{t.root}/out/%2E%2E/%2e%2e/elsewhere", "must not contain '..' segments"),
        ("source", f"file://{t.root}/escape", "a symlink leads it outside the allowed roots"),
        ("target", f"file://{t.root}/escape-out/native", "a symlink leads it outside the allowed roots"),
        ("target", f"file://{t.outside}/native", "must lie under one of the allowed roots"),
        ("source", f"file://{t.root}/a%00b", "control characters"),
        ("target", f"file://{t.root}/a\x7fb", "control characters"),
        ("source", "s3://models/ckpt/%2e%2e/other", "'..' segments (also percent-encoded)"),
        ("target", "s3://models/out\n/x", "control characters"),
        ("target", "s3://models/out/./x", "'.' or '..' segments"),
        ("source", "s3://xn--models/ckpt", "not a valid S3 bucket name"),
        ("source", "s3://models-s3alias/ckpt", "not a valid S3 bucket name"),
        ("source", "s3://models/" + "k" * 1024, "leaves no room for file names"),
        ("source", "hf://org/repo@main..other", "not a valid revision"),
        ("source", "hf://org/repo@refs/.hidden", "not a valid revision"),
        ("source", "hf://org/repo@main.lock", "not a valid revision"),
        ("source", "hf://org/repo@%2e%2e", "not a valid revision"),
        ("source", "hf://org/-repo", "not a Hub model repo id"),
        ("source", "hf://org/repo--x", "not a Hub model repo id"),
        ("target", "hf://org/repo.git", "not a Hub model repo id"),
        ("target", "hf://org/" + "r" * 97, "not a Hub model repo id"),
    ]


def test_locations_that_escape_or_break_store_rules(tree: Tree) -> None:
    settings = StoreSettings(file_roots=(tree.root,))
    for field, url, says in bad_locations(tree):
        with pytest.raises(RecastError, match=f"^{field}: ") as info:
            parse_location(url, field, settings)
        assert says in str(info.value), (url, str(info.value))
        assert "\n" not in str(info.value) and "\x7f" not in str(info.value)  # echoed spelled out
    fine = ["s3://models/a/b", "s3://my.models/x", "hf://org/repo@refs/pr/3", "hf://org/repo@v1.0",
            "hf://org/repo@" + "0" * 40, f"file://{tree.root}/alias", f"file://{tree.root}/%252e%252e"]  # fmt: skip
    for url in fine:
        parse_location(url, "source", settings)


# ------------------------------------------------------------------------------------------ file targets


def test_a_target_is_not_written_through_a_symlink_placed_after_submission(
    tree: Tree, tmp_path: Path
) -> None:
    settings = StoreSettings(file_roots=(tree.root,))
    before = tree.fingerprint()
    loc = parse_location(f"file://{tree.root}/late/native", "target", settings)
    (tree.root / "late").mkdir()
    # The staging directory's name is predictable: a symlink placed there first is refused.
    (tree.root / "late" / ".native.recast-j1").symlink_to(tree.outside, target_is_directory=True)
    target = open_target(loc, settings, "j1")
    with pytest.raises(RecastError, match="is a symlink or lies under one"):
        target.local_dir()
    with pytest.raises(RecastError, match="is a symlink or lies under one"):
        target.publish({}, "", False)
    # So is a parent swapped for a symlink after the location was checked.
    (tree.root / "late").rename(tmp_path / "moved")
    (tree.root / "late").symlink_to(tree.outside, target_is_directory=True)
    with pytest.raises(RecastError, match="is a symlink or lies under one"):
        open_target(loc, settings, "j2").local_dir()
    assert tree.fingerprint() == before


# --------------------------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def service(tree: Tree, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(tmp_path_factory.mktemp("paths-svc"), {"RECAST_FILE_ROOTS": str(tree.root)})
    try:
        yield svc.start(workers=1)
    finally:
        svc.stop()


def test_api_refuses_at_submission_naming_the_field(service: Service, tree: Tree) -> None:
    before = tree.fingerprint()
    body = {"source": f"file://{tree.good}", "target": f"file://{tree.root}/out", "to": "native"}
    with service.client() as c:
        for field, url, says in bad_locations(tree):
            r = c.post("/v1/jobs", json={**body, field: url})
            assert r.status_code == 422 and r.json()["code"] == "invalid_location", (url, r.text)
            assert r.json()["detail"].startswith(f"{field}: ") and says in r.json()["detail"], url
        for case, (_, says, names) in CASES.items():
            r = c.post("/v1/jobs", json={**body, "source": f"file://{tree.root / case}"})
            assert r.status_code == 422 and r.json()["code"] == "not_a_checkpoint", (case, r.text)
            detail = r.json()["detail"]
            assert detail.startswith("source: ") and says in detail and names in detail, (case, detail)
            r = c.post("/v1/inspect", json={"source": f"file://{tree.root / case}"})
            assert r.status_code == 422 and names in r.json()["detail"], (case, r.text)
        assert c.get("/v1/jobs").json()["jobs"] == []
        # A symlink that stays under the root is followed.
        assert c.post("/v1/inspect", json={"source": f"file://{tree.root}/alias"}).status_code == 200
    assert tree.fingerprint() == before


def test_a_carried_symlink_fails_the_job_on_the_worker(service: Service, tree: Tree) -> None:
    body = {
        "source": f"file://{tree.root / CARRIED}",
        "target": f"file://{tree.root}/carried-out",
        "to": "native",
    }
    with service.client() as c:
        job = wait(c, submit(c, body)["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "bad_checkpoint", job
    assert "'tokenizer.json' leads outside the checkpoint directory" in job["error"]["message"]
    assert not (tree.root / "carried-out").exists()
    # staging removed, by the failing unit or by a shard unit still running then, once it stops
    deadline = time.monotonic() + 15
    while (staged := [p for p in tree.root.iterdir() if p.name.startswith(".carried-out")]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert not staged
    assert os.listdir(tree.outside / CARRIED) == ["secret.json"]
