"""Where adapters live: a persistent versioned store and device/host/disk residency tiers.

Depends only on vera_core (never on server/).
"""

from adapters_store.backend import AdapterBackend, RecoveryReport
from adapters_store.errors import (
    AdapterLoadTimeout,
    AdapterNotFound,
    InvalidUserId,
    SlotsExhausted,
    StoreCorruptError,
    StoreError,
)
from adapters_store.ids import USER_ID_PATTERN, validate_user_id
from adapters_store.local import LocalBackend
from adapters_store.meta import AdapterMeta
from adapters_store.residency import SlotPool, SlotTicket
from adapters_store.store import AdapterStore

__all__ = [
    "USER_ID_PATTERN",
    "AdapterBackend",
    "AdapterLoadTimeout",
    "AdapterMeta",
    "AdapterNotFound",
    "AdapterStore",
    "InvalidUserId",
    "LocalBackend",
    "RecoveryReport",
    "SlotPool",
    "SlotTicket",
    "SlotsExhausted",
    "StoreCorruptError",
    "StoreError",
    "validate_user_id",
]
