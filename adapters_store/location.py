"""The one place a store location from the configuration becomes a backend, a key registry and
a fine-tuning store.

A directory gives ``LocalBackend(dir)`` + ``SqliteUsers(dir / "users.sqlite")`` +
``SqliteTraining(dir / "training.sqlite")`` (one server process); a ``postgresql://`` (or
``postgres://``) URL gives ``PostgresBackend`` + ``PostgresUsers`` + ``PostgresTraining``
sharing one connection pool, with the schema migrated once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapters_store.backend import DEFAULT_RETAIN_S, AdapterBackend
from adapters_store.local import LocalBackend
from adapters_store.postgres import PostgresBackend
from adapters_store.training import PostgresTraining, SqliteTraining, TrainingStore
from adapters_store.users import PostgresUsers, SqliteUsers, UserRegistry

_SCHEMES = ("postgresql:", "postgres:")


@dataclass(frozen=True)
class Storage:
    """Where adapters, API keys and fine-tuning files and jobs live. ``description`` names it
    for logs, without secrets: ``postgresql://vera@127.0.0.1:5432/vera`` or the directory."""

    backend: AdapterBackend
    users: UserRegistry
    training: TrainingStore
    description: str

    def close(self) -> None:
        """Close the fine-tuning store and the registry, then the backend (and its pool).
        Idempotent."""
        self.training.close()
        self.users.close()
        self.backend.close()


def is_database_url(location: str | Path) -> bool:
    """True for ``postgresql://...`` and ``postgres://...`` locations."""
    return str(location).startswith(_SCHEMES)


def open_storage(location: str | Path, *, retain_s: float = DEFAULT_RETAIN_S) -> Storage:
    """Open (creating if needed) the storage at ``location``: a directory or a database URL.

    A database URL must be a ``str`` (a ``Path`` would fold its ``//``). Raises
    StoreUnavailable if the database cannot be reached.
    """
    if is_database_url(location):
        if not isinstance(location, str):
            raise ValueError("a database URL must be passed as a str, not a Path")
        backend = PostgresBackend(location, retain_s)
        pool = backend.pool
        return Storage(backend, PostgresUsers(pool), PostgresTraining(pool), backend.description)
    root = Path(location)
    local = LocalBackend(root, retain_s)
    users, training = SqliteUsers(root / "users.sqlite"), SqliteTraining(root / "training.sqlite")
    return Storage(local, users, training, str(root))
