"""Who is calling: admin (VERA_ADMIN_TOKEN), a user (their API key), or anyone in dev mode."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass

from fastapi import Request

from server.api.errors import ApiError
from server.auth import KeyCache


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
