"""Where adapters live: a persistent versioned store of users' adapters; and the fine-tuning
files and jobs that make them (``training``).

Depends only on vera_core (never on server/).
"""

from adapters_store.backend import DEFAULT_RETAIN_S, AdapterBackend, RecoveryReport
from adapters_store.errors import (
    AdapterNotFound,
    InvalidUserId,
    JobLimit,
    StoreCorruptError,
    StoreError,
    StoreUnavailable,
    UserExists,
)
from adapters_store.ids import USER_ID_PATTERN, validate_user_id
from adapters_store.local import LocalBackend
from adapters_store.location import Storage, is_database_url, open_storage
from adapters_store.meta import AdapterMeta
from adapters_store.postgres import PostgresBackend
from adapters_store.store import AdapterStore
from adapters_store.training import (
    TERMINAL,
    FileRecord,
    JobEvent,
    JobRecord,
    PostgresTraining,
    SqliteTraining,
    TrainingStore,
)
from adapters_store.users import PostgresUsers, SqliteUsers, UserRegistry

__all__ = [
    "DEFAULT_RETAIN_S",
    "TERMINAL",
    "USER_ID_PATTERN",
    "AdapterBackend",
    "AdapterMeta",
    "AdapterNotFound",
    "AdapterStore",
    "FileRecord",
    "InvalidUserId",
    "JobEvent",
    "JobLimit",
    "JobRecord",
    "LocalBackend",
    "PostgresBackend",
    "PostgresTraining",
    "PostgresUsers",
    "RecoveryReport",
    "SqliteTraining",
    "SqliteUsers",
    "Storage",
    "StoreCorruptError",
    "StoreError",
    "StoreUnavailable",
    "TrainingStore",
    "UserExists",
    "UserRegistry",
    "is_database_url",
    "open_storage",
    "validate_user_id",
]
