"""Which checkpoint a schedule converts: the newest one under a location whose name matches a pattern,
or the newest revision of a Hub repo. A checkpoint counts once its index (written last) exists."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from worker.engine.checkpoint import INDEX, SINGLE
from worker.engine.errors import RecastError

from .locations import Location
from .settings import StoreSettings


@dataclass(frozen=True)
class Newest:
    url: str  # the checkpoint's own location
    name: str  # its directory name (the Hub repo's name for hf://)
    revision: str  # changes whenever its contents do: index ETag, mtime, or commit SHA


def newest_checkpoint(
    loc: Location, pattern: str | None, settings: StoreSettings, credential: str | None = None
) -> Newest:
    if loc.scheme == "hf":
        from . import pin_revision

        pinned = pin_revision(loc, settings, credential)
        return Newest(pinned.url, loc.root.rsplit("/", 1)[-1], pinned.revision or "")
    if not pattern:
        raise RecastError("template.source_pattern: required for a file:// or s3:// schedule source")
    found = _s3(loc, pattern, settings, credential) if loc.scheme == "s3" else _local(loc, pattern)
    if not found:
        raise RecastError(f"template.source: no complete checkpoint matching {pattern!r} under {loc.url}")
    return max(found, key=lambda f: (f[0], f[1].name))[1]  # same second: the later name


def _local(loc: Location, pattern: str) -> list[tuple[float, Newest]]:
    out = []
    for d in sorted(Path(loc.root).iterdir()) if Path(loc.root).is_dir() else []:
        marker = next((d / m for m in (INDEX, SINGLE) if (d / m).is_file()), None)
        if d.is_dir() and fnmatch.fnmatchcase(d.name, pattern) and marker is not None:
            st = marker.stat()
            out.append((st.st_mtime, Newest(f"file://{d}", d.name, f"{d.name}@{st.st_mtime_ns}")))
    return out


def _s3(
    loc: Location, pattern: str, settings: StoreSettings, credential: str | None
) -> list[tuple[float, Newest]]:
    from .s3 import make_client, storage_error

    client = make_client(settings, credential)
    base = f"{loc.prefix}/" if loc.prefix else ""
    out = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=loc.root, Prefix=base, Delimiter="/")
        names = [p["Prefix"][len(base) : -1] for page in pages for p in page.get("CommonPrefixes", [])]
        for name in names:
            if not fnmatch.fnmatchcase(name, pattern):
                continue
            for marker in (INDEX, SINGLE):
                got = client.list_objects_v2(Bucket=loc.root, Prefix=f"{base}{name}/{marker}", MaxKeys=1)
                obj = next((o for o in got.get("Contents", []) if o["Key"] == f"{base}{name}/{marker}"), None)
                if obj is not None:
                    url = f"s3://{loc.root}/{base}{name}"
                    etag = obj["ETag"].strip('"')
                    out.append((obj["LastModified"].timestamp(), Newest(url, name, f"{name}@{etag}")))
                    break
    except Exception as exc:
        raise storage_error(exc, loc.url, credential, RecastError) from None
    return out
