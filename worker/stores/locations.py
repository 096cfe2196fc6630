"""Checkpoint locations as URLs: ``file:///abs/path``, ``s3://bucket/prefix``, ``hf://org/repo[@revision]``.

Parsing happens when a job is submitted, so a bad URL fails the request with a message naming the field
instead of failing a worker minutes later. Local paths are confined to the operator's ``RECAST_FILE_ROOTS``
because a job request must not be able to read or overwrite arbitrary files on the worker. URLs never
carry credentials (jobs name one instead), and any user-info part is masked before a URL is echoed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from worker.engine.errors import RecastError

from .settings import StoreSettings

ACCEPTED = "file:///absolute/path, s3://bucket/prefix or hf://org/repo[@revision]"
# S3's bucket naming rules (no dots next to dots or dashes, not an IPv4 address).
_BUCKET = re.compile(r"[a-z0-9](?:[a-z0-9.-]{1,61})[a-z0-9]")
_IPV4 = re.compile(r"\d+\.\d+\.\d+\.\d+")
# The Hub's repo-id rules, as huggingface_hub validates them: word characters, "." and "-", at most 96.
_REPO_PART = re.compile(r"\w(?:[\w.-]{0,94}\w)?", re.ASCII)
_REVISION = re.compile(r"[\w.\-/]+", re.ASCII)
_USERINFO = re.compile(r"^([a-z0-9]+://)[^/]*@")


@dataclass(frozen=True)
class Location:
    """A parsed location; ``url`` is canonical, so equal places compare equal."""

    scheme: str
    url: str
    root: str
    prefix: str = ""
    revision: str | None = None


def parse_location(url: str, field: str, settings: StoreSettings) -> Location:
    """Parse ``url`` given for request field ``field``; raises RecastError naming the field."""
    shown = _USERINFO.sub(r"\1***@", url)
    if _USERINFO.match(url):
        raise RecastError(
            f"{field}: {shown}: credentials are not accepted in URLs; reference a named credential instead"
        )
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("file", "s3", "hf"):
        raise RecastError(f"{field}: {shown!r} is not a supported location; use {ACCEPTED}")
    if "?" in rest or "#" in rest:
        raise RecastError(f"{field}: {shown}: query strings and fragments are not supported; use {ACCEPTED}")
    where = f"{field}: {shown}"
    if scheme == "file":
        return _parse_file(rest, where, settings.file_roots)
    return _parse_s3(rest, where) if scheme == "s3" else _parse_hf(rest, where)


def _parse_file(rest: str, where: str, file_roots: tuple[Path, ...]) -> Location:
    host, _, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise RecastError(f"{where}: file URLs name a local path (file:///absolute/path), not host {host!r}")
    if not file_roots:
        raise RecastError(
            f"{where}: local paths are disabled; set RECAST_FILE_ROOTS to the allowed directories"
        )
    decoded = unquote(path)
    if any(ord(c) < 32 for c in decoded):
        raise RecastError(f"{where}: the path contains control characters")
    resolved = Path("/" + decoded).resolve()
    roots = [r.resolve() for r in file_roots]
    if not any(resolved != r and resolved.is_relative_to(r) for r in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise RecastError(f"{where}: local paths must lie under one of the allowed roots ({allowed})")
    return Location("file", resolved.as_uri(), str(resolved))


def _parse_s3(rest: str, where: str) -> Location:
    bucket, _, key = rest.partition("/")
    if (
        not _BUCKET.fullmatch(bucket)
        or _IPV4.fullmatch(bucket)
        or any(s in bucket for s in ("..", ".-", "-."))
    ):
        raise RecastError(
            f"{where}: {bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, digits, '.', '-')"
        )
    prefix = key.strip("/")
    parts = prefix.split("/") if prefix else []
    if any(p in ("", ".", "..") for p in parts) or "\\" in prefix:
        raise RecastError(
            f"{where}: the key prefix must not contain empty, '.' or '..' segments or backslashes"
        )
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    return Location("s3", url, bucket, prefix)


def _parse_hf(rest: str, where: str) -> Location:
    repo, at, revision = rest.partition("@")
    parts = repo.split("/")
    if (
        len(parts) != 2
        or not all(_REPO_PART.fullmatch(p) for p in parts)
        or "--" in repo
        or ".." in repo
        or repo.endswith(".git")
    ):
        raise RecastError(f"{where}: {repo!r} is not a Hub model repo id; use hf://org/repo[@revision]")
    if at and (not _REVISION.fullmatch(revision) or any(p in ("", ".", "..") for p in revision.split("/"))):
        raise RecastError(f"{where}: {revision!r} is not a valid revision (a branch, tag or commit SHA)")
    url = f"hf://{repo}@{revision}" if at else f"hf://{repo}"
    return Location("hf", url, repo, revision=revision if at else None)
