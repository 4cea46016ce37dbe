"""Who is calling: admin (VERA_ADMIN_TOKEN), a user (their API key), or anyone in dev mode."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass

from fastapi import Request

from server.api.deps import get_runtime
from server.api.errors import ApiError
from server.auth import KeyCache, key_digest
from server.engine.llm_engine import ANONYMOUS

ADMIN_CLIENT = "admin"  # the tenant the admin token's own base-model requests count against


@dataclass(frozen=True)
class Principal:
    kind: str  # "admin" | "user" | "dev"
    user_id: str | None = None
    key_id: str | None = None  # names the key in usage ("key_" + its digest's prefix)

    @property
    def is_admin(self) -> bool:
        return self.kind in ("admin", "dev")

    def may_use(self, user_id: str) -> bool:
        return self.is_admin or self.user_id == user_id

    def client(self, user_id: str | None) -> str:
        """The tenant a request counts against: the user whose adapter it runs; for the base
        model, the key's user (the admin's own, or "anonymous" in dev mode)."""
        if user_id is not None:
            return user_id
        if self.user_id is not None:
            return self.user_id
        return ADMIN_CLIENT if self.kind == "admin" else ANONYMOUS


async def principal(request: Request) -> Principal:
    """FastAPI dependency: authenticate the bearer token (no worker thread for a known key)."""
    rt = get_runtime(request)
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
        return Principal("admin", key_id=ADMIN_CLIENT)
    keys: KeyCache = request.app.state.keys
    user_id = keys.fresh(token) or await asyncio.to_thread(keys.lookup, token)
    if user_id is None:
        raise ApiError(401, "invalid API key", "unauthorized", {"WWW-Authenticate": "Bearer"})
    return Principal("user", user_id, "key_" + key_digest(token)[:12])


def require_admin(p: Principal) -> None:
    if not p.is_admin:
        raise ApiError(403, "this endpoint needs the admin token", "forbidden")


def require_access(p: Principal, user_id: str) -> None:
    if not p.may_use(user_id):
        raise ApiError(403, "this key may only use its own user's adapter", "forbidden")
