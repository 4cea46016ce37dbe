"""The one place a store location from the configuration becomes this process's storage.

A directory or a ``postgresql://`` (``postgres://``) URL opens one ``Database`` (a directory's
``vera.sqlite``, or one connection pool), handed to each component: the adapter versions (with
the default blob store beside that database: files under ``<dir>/adapters``, or the
``vera_blobs`` table), the API keys and the fine-tuning jobs. Each component migrates its own
tables when it is built; a directory store written before ``vera.sqlite`` existed is imported
then, component by component (``adapters_store.database.LegacyFile``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapters_store import (
    DEFAULT_RETAIN_S,
    AdapterBackend,
    Database,
    default_blobs,
    open_database,
)
from server.auth import KeyRegistry
from server.finetune.store import JobStore


@dataclass(frozen=True)
class Storage:
    """Where adapters, API keys and fine-tuning files and jobs live. ``description`` names it
    for logs, without secrets: ``postgresql://vera@127.0.0.1:5432/vera`` or the directory."""

    db: Database
    adapters: AdapterBackend
    keys: KeyRegistry
    jobs: JobStore
    description: str

    def close(self) -> None:
        """Close the adapter backend, then the database (its pool, its change feeds).
        Idempotent."""
        self.adapters.close()
        self.db.close()


def open_storage(location: str | Path, *, retain_s: float = DEFAULT_RETAIN_S) -> Storage:
    """Open (creating or migrating if needed) the storage at ``location``: a directory or a
    database URL (a ``str``: a ``Path`` would fold its ``//``). Raises StoreUnavailable if the
    database cannot be reached."""
    db = open_database(location)
    try:
        adapters = AdapterBackend(db, default_blobs(db), retain_s)
        keys, jobs = KeyRegistry(db), JobStore(db)
    except BaseException:
        db.close()
        raise
    return Storage(db, adapters, keys, jobs, db.description)
