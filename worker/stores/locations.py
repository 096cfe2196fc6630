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
# S3's bucket naming rules (no dots next to dots or dashes, not an IPv4 address, none of the prefixes and
# suffixes AWS reserves for its own kinds of bucket and access point).
_BUCKET = re.compile(r"[a-z0-9](?:[a-z0-9.-]{1,61})[a-z0-9]")
_IPV4 = re.compile(r"\d+\.\d+\.\d+\.\d+")
_BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_MAX_KEY_BYTES = 1024
# The Hub's repo-id rules, as huggingface_hub validates them: word characters, "." and "-", at most 96.
_REPO_PART = re.compile(r"\w(?:[\w.-]{0,94}\w)?", re.ASCII)
# Branch and tag names as git accepts them (check-ref-format), in the characters the Hub uses; commit SHAs.
_REVISION = re.compile(r"[\w.\-/]{1,255}", re.ASCII)
_USERINFO = re.compile(r"^([a-z0-9]+://)[^/]*@")


@dataclass(frozen=True)
class Location:
    """A parsed location; ``url`` is canonical, so equal places compare equal."""

    scheme: str
    url: str
    root: str
    prefix: str = ""
    revision: str | None = None


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or c == "\x7f" for c in text)


def parse_location(url: str, field: str, settings: StoreSettings) -> Location:
    """Parse ``url`` given for request field ``field``; raises RecastError naming the field."""
    # Echoed in problems and logs: user info masked, control characters spelled out.
    shown = "".join(f"\\x{ord(c):02x}" if _has_control(c) else c for c in _USERINFO.sub(r"\1***@", url))
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
    """An absolute path under one of the roots, checked after percent-decoding (``%2e%2e`` is ``..``) and
    after following symlinks. ``..`` is refused outright, even where it would stay under a root: a
    schedule's ``{name}`` filled with ``..`` must not move its target up a level."""
    host, _, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise RecastError(f"{where}: file URLs name a local path (file:///absolute/path), not host {host!r}")
    if not file_roots:
        raise RecastError(
            f"{where}: local paths are disabled; set RECAST_FILE_ROOTS to the allowed directories"
        )
    decoded = unquote(path)
    if _has_control(decoded):
        raise RecastError(f"{where}: the path contains control characters")
    if ".." in decoded.split("/"):
        raise RecastError(f"{where}: the path must not contain '..' segments")
    plain = Path("/" + decoded)
    resolved = plain.resolve()
    roots = [r.resolve() for r in file_roots]
    allowed = ", ".join(str(r) for r in roots)
    if not any(resolved != r and resolved.is_relative_to(r) for r in roots):
        if any(plain.is_relative_to(r) for r in roots):
            raise RecastError(f"{where}: a symlink leads it outside the allowed roots ({allowed})")
        raise RecastError(f"{where}: local paths must lie under one of the allowed roots ({allowed})")
    return Location("file", resolved.as_uri(), str(resolved))


def _parse_s3(rest: str, where: str) -> Location:
    bucket, _, key = rest.partition("/")
    if (
        not _BUCKET.fullmatch(bucket)
        or _IPV4.fullmatch(bucket)
        or any(s in bucket for s in ("..", ".-", "-."))
        or bucket.startswith(_BUCKET_RESERVED_PREFIXES)
        or bucket.endswith(_BUCKET_RESERVED_SUFFIXES)
    ):
        raise RecastError(
            f"{where}: {bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, digits, '.', '-'; "
            "not an IP address, no reserved prefix or suffix)"
        )
    prefix = key.strip("/")
    parts = prefix.split("/") if prefix else []
    if _has_control(prefix):
        raise RecastError(f"{where}: the key prefix contains control characters")
    # Keys are taken literally, but a '%2e%2e' segment becomes '..' wherever a key is put in a URL path
    # and decoded, so it is refused like '..' itself.
    if any(unquote(p) in ("", ".", "..") for p in parts) or "\\" in prefix:
        raise RecastError(
            f"{where}: the key prefix must not contain empty, '.' or '..' segments (also percent-encoded) "
            "or backslashes"
        )
    if len(prefix.encode()) >= _MAX_KEY_BYTES:
        raise RecastError(f"{where}: the key prefix leaves no room for file names in an S3 key "
                          f"({_MAX_KEY_BYTES} bytes at most)")  # fmt: skip
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    return Location("s3", url, bucket, prefix)


def _valid_revision(revision: str) -> bool:
    """A branch, tag (``v1.0``, ``refs/pr/3``) or commit SHA: git's ref-name rules, which also keep it
    from meaning anything else in the Hub's URL paths (no ``..``, no hidden or ``.lock`` segments)."""
    return (
        _REVISION.fullmatch(revision) is not None
        and ".." not in revision
        and not revision.endswith(".")
        and all(p and not p.startswith(".") and not p.endswith(".lock") for p in revision.split("/"))
    )


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
    if at and not _valid_revision(revision):
        raise RecastError(f"{where}: {revision!r} is not a valid revision (a branch, tag or commit SHA)")
    url = f"hf://{repo}@{revision}" if at else f"hf://{repo}"
    return Location("hf", url, repo, revision=revision if at else None)
