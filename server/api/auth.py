"""Who is calling: admin (VERA_ADMIN_TOKEN), a user (their API key), or anyone in dev mode."""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from dataclasses import dataclass

from fastapi import Request

from adapters_store import StoreUnavailable
from adapters_store.users import UserRegistry, key_digest
from server.api.errors import ApiError

KEY_CACHE_TTL_S = 10.0  # a rotated key stops working on every replica within this


class KeyCache:
    """Known user keys (by SHA-256 digest), so most requests authenticate without a store call.

    An entry is trusted for ``ttl_s`` after the registry last confirmed it; while the registry
    is unreachable (``StoreUnavailable``) entries of any age are trusted, so users this server
    already knows keep being served through a database outage. Unknown keys always ask the
    registry (never cached as invalid).
    """

    def __init__(self, registry: UserRegistry, ttl_s: float = KEY_CACHE_TTL_S) -> None:
        self.registry, self.ttl_s = registry, ttl_s
        self._known: dict[str, tuple[str, float]] = {}  # digest -> (user_id, confirmed at)
        self._lock = threading.Lock()

    def fresh(self, key: str) -> str | None:
        """The user of a recently confirmed key, without I/O; None means: ask ``lookup``."""
        with self._lock:
            hit = self._known.get(key_digest(key))
        if hit is not None and time.monotonic() - hit[1] < self.ttl_s:
            return hit[0]
        return None

    def lookup(self, key: str) -> str | None:
        """Ask the registry (blocking I/O: call from a worker thread)."""
        digest = key_digest(key)
        try:
            user_id = self.registry.authenticate(key)
        except StoreUnavailable:
            with self._lock:
                hit = self._known.get(digest)
            if hit is None:
                raise
            return hit[0]
        with self._lock:
            if user_id is None:
                self._known.pop(digest, None)
            else:
                self._known[digest] = (user_id, time.monotonic())
        return user_id


@dataclass(frozen=True)
class Principal:
    kind: str  # "admin" | "user" | "dev"
    user_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind in ("admin", "dev")

    def may_use(self, user_id: str) -> bool:
        return self.is_admin or self.user_id == user_id


async def principal(request: Request) -> Principal:
    """FastAPI dependency: authenticate the bearer token (no worker thread for a known key)."""
    rt = request.app.state.runtime
    if rt.config.dev_mode:
        return Principal("dev")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "missing 'Authorization: Bearer <key>' header",
            "unauthorized",
            {"WWW-Authenticate": "Bearer"},
        )
    token = token.strip()
    if hmac.compare_digest(token.encode(), rt.config.admin_token.encode()):
        return Principal("admin")
    keys: KeyCache = request.app.state.keys
    user_id = keys.fresh(token) or await asyncio.to_thread(keys.lookup, token)
    if user_id is None:
        raise ApiError(401, "invalid API key", "unauthorized", {"WWW-Authenticate": "Bearer"})
    return Principal("user", user_id)


def require_admin(p: Principal) -> None:
    if not p.is_admin:
        raise ApiError(403, "this endpoint needs the admin token", "forbidden")


def require_access(p: Principal, user_id: str) -> None:
    if not p.may_use(user_id):
        raise ApiError(403, "this key may only use its own user's adapter", "forbidden")
