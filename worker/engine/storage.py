"""Where checkpoint bytes come from.

A ``Source`` is the one interface the engine reads through: list, size, byte-range read. A local
directory implements it with ``pread``; remote stores (S3 ranged GETs, the Hub's resolve endpoint)
implement the same four methods, so planning reads headers only and never downloads a whole model.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Protocol

from .errors import CheckpointError


class Source(Protocol):
    """Read-only view of one checkpoint directory, addressed by relative POSIX names."""

    description: str

    def list(self) -> list[str]: ...

    def size(self, name: str) -> int: ...

    def read_range(self, name: str, start: int, end: int) -> bytes: ...

    def exists(self, name: str) -> bool: ...


def check_relative(name: str, where: str) -> str:
    """Reject names that would escape the checkpoint directory (absolute, ``..``, backslashes)."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name:
        raise CheckpointError(f"{where}: file name {name!r} points outside the checkpoint directory")
    return name


class LocalSource:
    """A checkpoint in a local directory."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()
        self.description = str(self.root)
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: not a directory")

    def _path(self, name: str) -> Path:
        check_relative(name, self.description)
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root):
            raise CheckpointError(f"{self.description}: {name!r} resolves outside the checkpoint directory")
        return path

    def list(self) -> list[str]:
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        path = self._path(name)
        if not path.is_file():
            raise CheckpointError(f"{self.description}: {name} does not exist")
        return path.stat().st_size

    def read_range(self, name: str, start: int, end: int) -> bytes:
        with open(self._path(name), "rb") as fh:
            data = os.pread(fh.fileno(), end - start, start)
        if len(data) != end - start:
            raise CheckpointError(
                f"{name}: expected {end - start} bytes at offset {start}, got {len(data)}; truncated"
            )
        return data

    def read_into(self, name: str, start: int, buf: memoryview) -> None:
        """Read ``len(buf)`` bytes at ``start`` straight into ``buf``: no intermediate copy."""
        want = len(buf)
        with open(self._path(name), "rb") as fh:
            got = 0
            while got < want:
                n = os.preadv(fh.fileno(), [buf[got:]], start + got)
                if n == 0:
                    raise CheckpointError(
                        f"{name}: expected {want} bytes at offset {start}, got {got}; truncated"
                    )
                got += n

    def read_bytes(self, name: str) -> bytes:
        return self._path(name).read_bytes()


def open_source(src: str | os.PathLike[str] | Source) -> Source:
    """A local path becomes a ``LocalSource``; a ``Source`` is used as it is."""
    return src if hasattr(src, "read_range") else LocalSource(src)


def read_all(source: Source, name: str) -> bytes:
    return source.read_range(name, 0, source.size(name))
