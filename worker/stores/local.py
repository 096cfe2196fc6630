"""Local-directory targets (``file://``), and the staging helpers the Hub target shares.

The staging directory is a hidden sibling of the target, so it is on the same filesystem and publishing
is one ``rename``: the target directory appears complete or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from worker.engine.errors import RecastError, TargetExistsError
from worker.engine.storage import LocalSource, Source, check_relative


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
    except OSError as exc:
        raise RecastError(f"{dest}: cannot stage {src.name} ({exc.strerror or exc})") from exc


def remove_tree(path: Path) -> None:
    """Delete ``path`` if it exists (discarding twice is not an error)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def keep_only(directory: Path, names: list[str]) -> None:
    """Check every one of ``names`` is staged and drop any other staged file, so exactly ``names`` publish."""
    staged = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()}
    if missing := sorted(set(names) - staged):
        raise RecastError(f"{directory}: cannot publish, not staged: {', '.join(missing)}")
    for extra in staged - set(names):
        (directory / extra).unlink()


class LocalStaging:
    """A target that stages in a local directory until it publishes."""

    description: str
    staging: Path

    def stage_file(self, name: str, path: Path) -> None:
        place_file(path, self.staging / check_relative(name, self.description))

    def staged(self) -> Source:
        self.staging.mkdir(parents=True, exist_ok=True)
        return LocalSource(self.staging)


class FileTarget(LocalStaging):
    """A local directory; staged in ``<parent>/.<name>.recast-<job_id>`` and renamed into place."""

    def __init__(self, path: Path, job_id: str):
        self.path = path
        self.staging = path.parent / f".{path.name}.recast-{job_id}"
        self.description = str(path)

    def is_empty(self) -> bool:
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    def publish(self, names: list[str], commit_message: str, create_pr: bool) -> dict[str, str]:
        """Rename the staging directory into place (``commit_message`` and ``create_pr`` are Hub-only)."""
        keep_only(self.staging, names)
        if not self.is_empty():
            raise TargetExistsError(f"{self.path}: already exists and is not empty; choose another target")
        if self.path.is_dir():
            self.path.rmdir()
        try:
            os.rename(self.staging, self.path)
        except OSError as exc:
            raise RecastError(f"{self.path}: cannot publish ({exc.strerror or exc})") from exc
        return {"url": self.path.as_uri()}

    def discard(self) -> None:
        remove_tree(self.staging)
