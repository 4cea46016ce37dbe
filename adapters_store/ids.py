"""User ids: validated before any path, key or SQL parameter is built from them."""

from __future__ import annotations

import re

from adapters_store.errors import InvalidUserId

USER_ID_PATTERN = r"[A-Za-z0-9._-]{1,128}"
_USER_ID_RE = re.compile(USER_ID_PATTERN)


def validate_user_id(user_id: str) -> str:
    """Return ``user_id`` unchanged if it matches ``USER_ID_PATTERN`` and is not '.' or '..'.

    Raises ``InvalidUserId`` (a ``ValueError``) whose message states the allowed pattern.
    """
    if not isinstance(user_id, str):
        raise InvalidUserId(f"user id must be a string, got {type(user_id).__name__}")
    if not _USER_ID_RE.fullmatch(user_id) or user_id in (".", ".."):
        shown = user_id if len(user_id) <= 40 else user_id[:40] + "..."
        raise InvalidUserId(
            f"invalid user id {shown!r} (length {len(user_id)}): must match {USER_ID_PATTERN} "
            "and not be '.' or '..'"
        )
    return user_id
