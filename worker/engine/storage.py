"""Where checkpoint bytes come from.

A ``Source`` is the one interface the engine reads through: list, size, byte-range read. A local
directory implements it with ``pread``; remote stores (S3 ranged GETs, the Hub's resolve endpoint)
implement the same four methods, so planning reads headers only and never downloads a whole model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote

from .errors import CheckpointError


class Source(Protocol):
    """Read-only view of one checkpoint directory, addressed by relative POSIX names."""

    description: str

    def list(self) -> list[str]: ...

    def size(self, name: str) -> int: ...

    def read_range(self, name: str, start: int, end: int) -> bytes: ...

    def exists(self, name: str) -> bool: ...


def check_relative(name: str, where: str) -> str:
    """Accept only plain relative names: ``a/b.safetensors``, never ``/abs``, ``..`` or ``a//b``.

    Names come from an untrusted index (or a store's listing) and become paths, object keys and URL
    paths, so anything that could leave the checkpoint directory there is refused here, once for every
    store: absolute paths, ``..`` and ``.`` segments (also percent-encoded, as a URL path may decode
    them), empty segments, backslashes and control characters (a NUL would otherwise surface as a bare
    ``ValueError`` from the OS layer).
    """
    if not name or any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise CheckpointError(f"{where}: file name {name!r} is empty or holds control characters")
    if "\\" in name or any(unquote(s) in ("", ".", "..") for s in name.split("/")):
        raise CheckpointError(
            f"{where}: file name {name!r} points outside the checkpoint directory (absolute, '..', '.' or "
            "empty segments, backslashes)"
        )
    return name


class LocalSource:
    """A checkpoint in a local directory.

    Every read stays inside it: a symlink may point elsewhere in the directory, but one that leads out
    (a shard, or a directory a shard name goes through) is refused, since the service confines jobs to
    ``RECAST_FILE_ROOTS`` and a symlink placed under a root must not carry a read past them.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()
        self.description = str(self.root)
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: not a directory")

    def _path(self, name: str) -> Path:
        check_relative(name, self.description)
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root):
            raise CheckpointError(
                f"{self.description}: {name!r} leads outside the checkpoint directory through a symlink"
            )
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
