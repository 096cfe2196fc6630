"""The dashboard's sign-ins: an opaque random id in the browser's cookie, its record in Redis.

The API token is checked once, at sign-in; the cookie carries only the session id, so a copied cookie
is worth a session (which expires after ``RECAST_SESSION_TTL_S``, 12 h by default, and ends at sign-out)
and never the token itself. Redis keeps, under a SHA-256 of the id, an HMAC of the token keyed by the id:
nothing in Redis gives back the token or a usable session id, yet every request can tell whether the
token its session came from is still configured, so taking a token out of ``RECAST_API_TOKENS`` (and
restarting the API) ends the sessions it opened as well.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence

import redis

PREFIX = "recast:session:"
_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


def _bound(session_id: str, token: str) -> str:
    """What ties a session to its token without storing the token."""
    return hmac.new(session_id.encode(), token.encode(), hashlib.sha256).hexdigest()


class Sessions:
    """Sign-ins over the API tokens configured now; ``r`` decodes responses (as the job store's does)."""

    def __init__(self, r: redis.Redis, tokens: Sequence[str], ttl_s: int):
        self.r, self.tokens, self.ttl_s = r, tuple(tokens), ttl_s

    @staticmethod
    def _key(session_id: str) -> str:
        return PREFIX + hashlib.sha256(session_id.encode()).hexdigest()

    def valid_token(self, given: str | None) -> bool:
        """Whether ``given`` is a configured token; every one is compared, so the time taken says nothing
        about a near match."""
        ok = False
        for t in self.tokens:
            ok |= hmac.compare_digest((given or "").encode(), t.encode())
        return ok

    def start(self, token: str) -> str | None:
        """A new session id for a valid ``token``; None for any other."""
        if not self.valid_token(token):
            return None
        session_id = secrets.token_urlsafe(32)
        self.r.set(self._key(session_id), _bound(session_id, token), ex=self.ttl_s)
        return session_id

    def check(self, session_id: str | None) -> bool:
        """The session exists, has not expired, and the token it came from is still configured (a session
        of a revoked token is deleted on sight)."""
        if not session_id or not _ID.fullmatch(session_id):
            return False
        bound = self.r.get(self._key(session_id))
        if bound is None:
            return False
        ok = False
        for t in self.tokens:
            ok |= hmac.compare_digest(_bound(session_id, t), bound)
        if not ok:
            self.end(session_id)
        return ok

    def end(self, session_id: str | None) -> None:
        """Sign out: the session is gone from the server, whatever the browser keeps."""
        if session_id and _ID.fullmatch(session_id):
            self.r.delete(self._key(session_id))
