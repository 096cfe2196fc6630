"""Service configuration, read once from the environment (RECAST_*); see the README's table."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from worker.engine.errors import RecastError
from worker.stores.settings import StoreSettings

QUEUE = "recast"  # the Celery queue every task goes to


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RecastError(f"{name} must be a whole number, not {raw!r}") from None
    if value <= 0:
        raise RecastError(f"{name} must be positive, not {value}")
    return value


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = None
    api_tokens: tuple[str, ...] = ()
    job_ttl_s: int = 7 * 24 * 3600
    shard_time_limit_s: int = 6 * 3600
    max_attempts: int = 3
    read_limit_bytes_s: int | None = None
    check_timeout_s: float = 5.0
    session_ttl_s: int = 12 * 3600
    stores: StoreSettings = field(default_factory=StoreSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        tokens = tuple(t.strip() for t in env.get("RECAST_API_TOKENS", "").split(",") if t.strip())
        limit = env.get("RECAST_READ_LIMIT_MB_S")
        check = env.get("RECAST_SUBMIT_CHECK_S")
        try:
            check_timeout = float(check) if check else cls.check_timeout_s
        except ValueError:
            raise RecastError(f"RECAST_SUBMIT_CHECK_S must be a number of seconds, not {check!r}") from None
        if check_timeout <= 0:
            raise RecastError(f"RECAST_SUBMIT_CHECK_S must be positive, not {check_timeout:g}")
        try:
            read_limit = int(float(limit) * 1_000_000) if limit else None
        except ValueError:
            raise RecastError(f"RECAST_READ_LIMIT_MB_S must be a number, not {limit!r}") from None
        return cls(
            redis_url=env.get("RECAST_REDIS_URL") or None,
            api_tokens=tokens,
            job_ttl_s=_int(env, "RECAST_JOB_TTL_S", cls.job_ttl_s),
            shard_time_limit_s=_int(env, "RECAST_SHARD_TIME_LIMIT_S", cls.shard_time_limit_s),
            max_attempts=_int(env, "RECAST_MAX_ATTEMPTS", cls.max_attempts),
            read_limit_bytes_s=read_limit or None,
            check_timeout_s=check_timeout,
            session_ttl_s=_int(env, "RECAST_SESSION_TTL_S", cls.session_ttl_s),
            stores=StoreSettings.from_env(env),
        )

    @property
    def visibility_timeout_s(self) -> int:
        """Above the hard limit of the longest task, or the broker redelivers a task still running."""
        return self.shard_time_limit_s + 600

    def credential_names(self) -> list[str]:
        """The credential names jobs may reference. Read on every call, as the stores read the file on
        every lookup, so a credential added to the mounted file is usable without a restart."""
        path = self.stores.credentials_file
        if path is None:
            return []
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            # Neither the file's text nor the decoder's message: either may quote a secret.
            raise RecastError(f"RECAST_CREDENTIALS_FILE {path}: cannot be read as JSON") from None
        if not isinstance(data, dict):
            raise RecastError(f"RECAST_CREDENTIALS_FILE {path}: must hold a JSON object of named credentials")
        return sorted(data)

    def required_redis_url(self) -> str:
        if not self.redis_url:
            raise RecastError("RECAST_REDIS_URL is not set; `recast up` starts an embedded Redis for you")
        return self.redis_url

    def broker_url(self) -> str:
        """Celery spells a unix-socket Redis ``redis+socket://``; redis-py spells it ``unix://``."""
        url = self.required_redis_url()
        if url.startswith("unix://"):
            return "redis+socket://" + url[len("unix://") :]
        return url
