"""Who may call: API keys in the store (``keys``) and the in-memory cache of known ones
(``key_cache``). The FastAPI dependency that reads the bearer token is ``server.api.auth``."""

from server.auth.key_cache import KEY_CACHE_TTL_S, KeyCache, KeyLookup
from server.auth.keys import KEY_PREFIX, KeyRegistry, UserExists, key_digest

__all__ = [
    "KEY_CACHE_TTL_S",
    "KEY_PREFIX",
    "KeyCache",
    "KeyLookup",
    "KeyRegistry",
    "UserExists",
    "key_digest",
]
