"""Where adapters live: versioned, validated adapter vectors in a store's database and blob
store, and what reads them back.

``database`` is the one handle on a store's database (a directory's SQLite file, or a shared
PostgreSQL database) on which every component of the server keeps its tables. Depends only on
vera_core (never on server/).
"""

from adapters_store.backend import (
    DEFAULT_RETAIN_S,
    AdapterBackend,
    LocalBackend,
    default_blobs,
    open_backend,
)
from adapters_store.blobs import BlobKey, BlobStore, StoredBlob
from adapters_store.database import (
    Database,
    LegacyFile,
    Sql,
    is_database_url,
    open_database,
)
from adapters_store.errors import (
    AdapterNotFound,
    InvalidUserId,
    StoreCorruptError,
    StoreError,
    StoreUnavailable,
)
from adapters_store.file_blobs import FileBlobs
from adapters_store.ids import USER_ID_PATTERN, validate_user_id
from adapters_store.meta import AdapterMeta
from adapters_store.pg_blobs import PgBlobs
from adapters_store.recovery import RecoveryReport
from adapters_store.store import AdapterStore

__all__ = [
    "DEFAULT_RETAIN_S",
    "USER_ID_PATTERN",
    "AdapterBackend",
    "AdapterMeta",
    "AdapterNotFound",
    "AdapterStore",
    "BlobKey",
    "BlobStore",
    "Database",
    "FileBlobs",
    "InvalidUserId",
    "LegacyFile",
    "LocalBackend",
    "PgBlobs",
    "RecoveryReport",
    "Sql",
    "StoreCorruptError",
    "StoreError",
    "StoreUnavailable",
    "StoredBlob",
    "default_blobs",
    "is_database_url",
    "open_backend",
    "open_database",
    "validate_user_id",
]
