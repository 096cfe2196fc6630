"""Local-directory targets (``file://``).

The commit protocol: workers write each output file straight into ``local_dir()``, a hidden sibling of
the target (``<parent>/.<name>.recast-<job_id>``), so it is on the target's filesystem and staging a file
already there moves nothing (a file written elsewhere is moved in, or copied across filesystems via a
temporary name). ``publish`` is one ``rename`` of that directory onto the target.

What a reader sees: no target directory (or an empty one) until the rename, then the complete output;
readers ignore hidden siblings. What a dead worker leaves: a partial file in the staging directory, which
the retried shard overwrites and ``publish`` drops because no receipt names it; a job that never
finishes leaves the staging directory until ``discard``. A finalize that dies after the rename finds the
staging directory gone and the target complete when run again, and reports success.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from worker.engine.errors import RecastError, TargetExistsError
from worker.engine.storage import check_relative

from . import Receipt


def place_file(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``; across filesystems copy via a temporary name so ``dest`` is never partial."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(src, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            partial = dest.with_name(f".{dest.name}.partial")
            try:
                shutil.copyfile(src, partial)
                os.replace(partial, dest)
            finally:
                partial.unlink(missing_ok=True)
            src.unlink()
    except OSError as exc:
        raise RecastError(f"{dest}: cannot stage {src.name} ({exc.strerror or exc})") from exc


def remove_tree(path: Path) -> None:
    """Delete ``path`` if it exists (discarding twice is not an error)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def _no_symlink(path: Path) -> Path:
    """Refuse ``path`` if it is, or lies under, a symlink. The target was checked against the file roots
    when the job was submitted and again when it was planned; a symlink placed since (on the staging
    directory's predictable name, say, or in place of the target's parent) must not carry the job's
    writes, or the rename that publishes them, outside the roots."""
    if os.path.realpath(path) != os.path.abspath(path):
        raise RecastError(f"{path}: is a symlink or lies under one; refusing to write through it")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return False


def _sizes(directory: Path) -> dict[str, int]:
    """Every file under ``directory`` by relative name, with its size."""
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*") if not p.is_dir()
    }


def _is_published(path: Path, staged: dict[str, Receipt]) -> bool:
    """``path`` holds the very files of the receipts: a rename keeps each file's inode."""
    for name, receipt in staged.items():
        try:
            stat = (path / name).stat()
        except FileNotFoundError:
            return False
        if (stat.st_ino, stat.st_size) != (receipt["inode"], receipt["size"]):
            return False
    return True


class FileTarget:
    """A local directory; written in ``<parent>/.<name>.recast-<job_id>`` and renamed into place."""

    def __init__(self, path: Path, job_id: str):
        self.path = path  # resolved by parse_location: no symlink on the way, at that moment
        self.staging = path.parent / f".{path.name}.recast-{job_id}"
        self.description = str(path)

    def is_empty(self) -> bool:
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    def local_dir(self) -> Path:
        """The staging directory, created on first use: workers write output files straight into it."""
        _no_symlink(self.path.parent)
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RecastError(
                f"{self.staging}: cannot create the staging directory ({exc.strerror})"
            ) from exc
        return _no_symlink(self.staging)

    def open_stream(self, name: str, size: int) -> None:
        """None: a file written straight into ``local_dir()`` is already where it will live."""
        return None

    def stage_file(self, name: str, path: Path, sha256: str) -> Receipt:
        """Nothing to do for a file already written into ``local_dir()``; anything else is moved in."""
        dest = self.local_dir() / check_relative(name, self.description)
        if not _same_file(path, dest):
            place_file(path, dest)
        stat = dest.stat()
        return {"size": stat.st_size, "sha256": sha256, "inode": stat.st_ino}

    def publish(
        self, staged: dict[str, Receipt], commit_message: str, create_pr: bool, replace: bool = False
    ) -> dict[str, str]:
        """Rename the staging directory into place (``commit_message`` and ``create_pr`` are Hub-only).

        Files in staging that no receipt names (partial writes of a dead worker) are dropped first. If the
        staging directory is gone and the target holds the receipts' files (same inodes), an earlier call
        got as far as the rename, and this one succeeds without doing anything.
        """
        _no_symlink(self.path)
        if not _no_symlink(self.staging).is_dir():
            if _is_published(self.path, staged):
                return {"url": self.path.as_uri()}
            raise RecastError(f"{self.staging}: cannot publish, the staging directory is gone")
        want = {name: receipt["size"] for name, receipt in staged.items()}
        have = _sizes(self.staging)
        if wrong := sorted(name for name, size in want.items() if have.get(name) != size):
            raise RecastError(
                f"{self.staging}: cannot publish, missing or not the size its receipt says: {', '.join(wrong)}"
            )
        for extra in have.keys() - want.keys():
            (self.staging / extra).unlink()
        old = None
        if not self.is_empty():
            if not replace:
                raise TargetExistsError(
                    f"{self.path}: already exists and is not empty; choose another target"
                )
            old = self.staging.with_name(self.staging.name + ".replaced")
            os.rename(self.path, old)  # the old checkpoint goes only once the new one is in place
        elif self.path.is_dir():
            self.path.rmdir()
        try:
            os.rename(self.staging, self.path)
        except OSError as exc:
            raise RecastError(f"{self.path}: cannot publish ({exc.strerror or exc})") from exc
        if old is not None:
            remove_tree(old)
        return {"url": self.path.as_uri()}

    def discard(self, staged: dict[str, Receipt] | None = None) -> None:
        """Remove the staging directory; a published target is left alone (it no longer is staging)."""
        remove_tree(self.staging)
