"""Store configuration from the environment, and credentials looked up by name.

Jobs name a credential; they never carry one. The secrets live in one JSON file the operator mounts
(``RECAST_CREDENTIALS_FILE``), read on every lookup so a rotated key takes effect without a restart.
Every error here names the variable, file or credential *name* involved and never a secret value.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from worker.engine.errors import RecastError

ADDRESSING_STYLES = ("auto", "path", "virtual")
CHECKSUM_MODES = ("when_supported", "when_required")
# What S3 verifies each uploaded part against: a SHA-256 per part, one CRC64-NVME over the whole object
# (needs awscrt, ``botocore[crt]``), or nothing, for S3-compatible stores that support neither (which
# usually also want RECAST_S3_CHECKSUM=when_required).
UPLOAD_CHECKSUMS = ("sha256", "crc64nvme", "none")
MIN_PART_BYTES = 5 << 20  # S3 rejects multipart parts below 5 MiB (except the last)

# Which fields each credential type accepts, and which of them it needs.
_CREDENTIAL_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "s3": (
        frozenset(
            {"aws_access_key_id", "aws_secret_access_key", "aws_session_token", "region", "endpoint_url"}
        ),
        frozenset({"aws_access_key_id", "aws_secret_access_key"}),
    ),
    "hf": (frozenset({"token"}), frozenset({"token"})),
}


class Credential(dict[str, str]):
    """A credential's fields; its repr lists field names only, so logging one never leaks a secret."""

    def __repr__(self) -> str:
        return f"Credential({', '.join(sorted(self))})"

    __str__ = __repr__


@dataclass(frozen=True)
class StoreSettings:
    """Where remote stores live and how to talk to them; one instance per process, from ``from_env``."""

    file_roots: tuple[Path, ...] = ()
    scratch: Path = Path(tempfile.gettempdir()) / "recast"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_addressing_style: str = "auto"
    s3_checksum: str = "when_supported"
    s3_multipart_chunk_bytes: int = 64 << 20
    s3_upload_checksum: str = "sha256"
    hf_endpoint: str = "https://huggingface.co"
    hf_timeout_s: float = 60.0
    credentials_file: Path | None = None

    def __post_init__(self) -> None:
        if self.s3_addressing_style not in ADDRESSING_STYLES:
            raise RecastError(
                f"RECAST_S3_ADDRESSING_STYLE must be one of {', '.join(ADDRESSING_STYLES)}; "
                f"got {self.s3_addressing_style!r}"
            )
        if self.s3_checksum not in CHECKSUM_MODES:
            raise RecastError(
                f"RECAST_S3_CHECKSUM must be one of {', '.join(CHECKSUM_MODES)}; got {self.s3_checksum!r} "
                "(use when_required for S3-compatible stores that reject CRC checksums)"
            )
        if self.s3_upload_checksum not in UPLOAD_CHECKSUMS:
            raise RecastError(
                f"RECAST_S3_UPLOAD_CHECKSUM must be one of {', '.join(UPLOAD_CHECKSUMS)}; "
                f"got {self.s3_upload_checksum!r} (none for S3-compatible stores without upload checksums)"
            )
        if self.s3_multipart_chunk_bytes < MIN_PART_BYTES:
            raise RecastError(
                f"RECAST_S3_MULTIPART_CHUNK_MB must be at least 5 (S3's smallest part); "
                f"got {self.s3_multipart_chunk_bytes / (1 << 20):g}"
            )
        if not self.hf_timeout_s > 0:
            raise RecastError(
                f"RECAST_HF_TIMEOUT_S must be a positive number of seconds; got {self.hf_timeout_s!r}"
            )
        if not self.hf_endpoint.startswith(("http://", "https://")):
            raise RecastError(f"RECAST_HF_ENDPOINT must be an http(s) URL; got {self.hf_endpoint!r}")
        for root in self.file_roots:
            if not root.is_absolute():
                raise RecastError(f"RECAST_FILE_ROOTS entries must be absolute paths; got {str(root)!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StoreSettings:
        """Read the ``RECAST_*`` variables; unset or empty ones keep their defaults."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        kwargs: dict[str, object] = {}
        if roots := get("RECAST_FILE_ROOTS"):
            parts = roots.replace(",", os.pathsep).split(os.pathsep)
            kwargs["file_roots"] = tuple(Path(p.strip()) for p in parts if p.strip())
        if scratch := get("RECAST_SCRATCH_DIR"):
            kwargs["scratch"] = Path(scratch)
        if chunk := get("RECAST_S3_MULTIPART_CHUNK_MB"):
            try:
                kwargs["s3_multipart_chunk_bytes"] = int(chunk) << 20
            except ValueError:
                raise RecastError(
                    f"RECAST_S3_MULTIPART_CHUNK_MB must be a whole number; got {chunk!r}"
                ) from None
        if timeout := get("RECAST_HF_TIMEOUT_S"):
            try:
                kwargs["hf_timeout_s"] = float(timeout)
            except ValueError:
                raise RecastError(
                    f"RECAST_HF_TIMEOUT_S must be a number of seconds; got {timeout!r}"
                ) from None
        if credentials := get("RECAST_CREDENTIALS_FILE"):
            kwargs["credentials_file"] = Path(credentials)
        for field, var in (
            ("s3_endpoint_url", "RECAST_S3_ENDPOINT_URL"),
            ("s3_region", "RECAST_S3_REGION"),
            ("s3_addressing_style", "RECAST_S3_ADDRESSING_STYLE"),
            ("s3_checksum", "RECAST_S3_CHECKSUM"),
            ("s3_upload_checksum", "RECAST_S3_UPLOAD_CHECKSUM"),
            ("hf_endpoint", "RECAST_HF_ENDPOINT"),
        ):
            if (value := get(var)) is not None:
                kwargs[field] = value
        if "hf_endpoint" in kwargs:
            kwargs["hf_endpoint"] = str(kwargs["hf_endpoint"]).rstrip("/")
        return cls(**kwargs)

    def credential(self, name: str | None, kind: str) -> Credential:
        """The fields of credential ``name`` (``kind`` is "s3" or "hf"), without its ``type``.

        ``None`` gives an empty credential: boto3's default chain, or the ambient Hugging Face token.
        """
        if name is None:
            return Credential()
        if self.credentials_file is None:
            raise RecastError(
                f"credential {name!r} was requested but RECAST_CREDENTIALS_FILE is not set; "
                "point it at the credentials JSON file"
            )
        entry = _load_credentials(self.credentials_file).get(name)
        if entry is None:
            raise RecastError(f"credential {name!r} is not defined in RECAST_CREDENTIALS_FILE")
        if not isinstance(entry, dict) or entry.get("type") != kind:
            found = entry.get("type") if isinstance(entry, dict) else None
            raise RecastError(
                f"credential {name!r} has type {found!r}; this location needs a {kind!r} credential"
            )
        allowed, required = _CREDENTIAL_FIELDS[kind]
        fields = {k: v for k, v in entry.items() if k != "type"}
        if unknown := sorted(set(fields) - allowed):
            raise RecastError(f"credential {name!r} has unknown fields {', '.join(unknown)}")
        if missing := sorted(f for f in required if not fields.get(f)):
            raise RecastError(f"credential {name!r} lacks {', '.join(missing)}")
        if not all(isinstance(v, str) for v in fields.values()):
            raise RecastError(f"credential {name!r}: every field must be a string")
        return Credential(fields)


def _load_credentials(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise RecastError(f"RECAST_CREDENTIALS_FILE {path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        # The decoder's message quotes no content, only where parsing stopped.
        raise RecastError(
            f"RECAST_CREDENTIALS_FILE {path}: not valid JSON (line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(data, dict):
        raise RecastError(f"RECAST_CREDENTIALS_FILE {path}: must hold a JSON object of named credentials")
    return data
