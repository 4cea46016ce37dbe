"""Adapter versions: a version index on the store's database, composed with a blob store.

The ``AdapterStore`` validates and (de)serializes adapters; the backend only keeps bytes (a
``BlobStore``: files of a directory store, rows of a PostgreSQL one, or any other that
implements the protocol) and the index (``VersionIndex``, SQL on the store's ``Database``).

Guarantees:

1. A version number is never reused for a user, even after ``remove`` (the engine's adapter
   slots key cached copies by ``(user_id, version)``). A version that was never visible (its publish
   failed or crashed before the publish point) may be handed out again: nobody cached it.
2. ``publish`` makes the blob durable *before* the index names it, so a crash leaves either the
   previous or the new version current, never a torn one.
3. A superseded or removed version stays readable for ``retain_s`` seconds (running requests and
   loaders keep the version they started with); then the next publish or remove of that user,
   ``collect_garbage`` or ``recover`` deletes it.
4. Calls that cannot reach a shared database raise ``StoreUnavailable`` within a few seconds.
5. On a shared store, ``subscribe`` hears every process's publishes and removes (the change
   feed), so replicas drop stale copies early; correctness never waits for it.

Publish order (each step durable before the next):

1. reserve the version in its own short transaction (a counter row per user, never deleted,
   bumped atomically across processes);
2. ``blobs.put`` the bytes, outside any transaction or lock;
3. one index transaction, under the user's writer lock: retire the older current row, insert
   the new one (already retired if a newer version is current: concurrent publishes), record it
   as the user's last committed version, delete the user's rows retired ``retain_s`` ago
   (returning their keys) and notify the change feed. Its COMMIT is the publish point;
4. delete the expired rows' blobs, after the commit (a crash in between leaves unindexed blobs,
   which recovery deletes: they are not above the last committed version).

A publish that fails before its publish point deletes the blob it wrote, unless it failed with
``StoreUnavailable`` (the commit's outcome may be unknown): then, as after a crash, recovery
settles the blob. ``read`` is one ``blobs.get``: no database connection is held meanwhile (the
caller looked the version up first). Recovery: ``adapters_store.recovery``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from adapters_store.blobs import BlobKey, BlobStore, label
from adapters_store.database import Database, is_database_url, open_database
from adapters_store.errors import StoreUnavailable
from adapters_store.file_blobs import FileBlobs
from adapters_store.meta import AdapterMeta
from adapters_store.pg_blobs import PgBlobs
from adapters_store.pg_database import PostgresDatabase
from adapters_store.recovery import BlobValidator, Reconciler, RecoveryReport
from adapters_store.sqlite_database import SqliteDatabase
from adapters_store.version_index import CHANNEL, VersionIndex

log = logging.getLogger(__name__)

DEFAULT_RETAIN_S = 300.0  # how long a superseded or removed version stays readable
# shared store: an unindexed blob younger than this may belong to a publish still in flight
DEFAULT_GRACE_S = 3600.0


def failpoint(name: str) -> None:
    """No-op in production; crash tests replace it to stop a writer at a named step."""


class AdapterBackend:
    """Versioned adapter blobs with a per-user current-version index (see the module
    docstring). Thread-safe. ``owns_db``: ``close`` closes ``db`` too."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        retain_s: float = DEFAULT_RETAIN_S,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        owns_db: bool = False,
    ) -> None:
        self.db, self.blobs = db, blobs
        self.retain_s, self.grace_s = retain_s, grace_s
        self.index = VersionIndex(db)
        self._owns_db = owns_db

    def publish(
        self, user_id: str, data: bytes, sha256: str, num_params: int, base_fingerprint: str
    ) -> AdapterMeta:
        """Store ``data`` durably as the user's next version and make it current; return it."""
        version = self.index.reserve(user_id)
        failpoint("reserved")
        try:
            self.blobs.put(user_id, version, data)
            failpoint("blob_written")
            now = time.time()
            meta = AdapterMeta(
                user_id, version, len(data), num_params, sha256, now, base_fingerprint
            )
            expired = self.index.commit(meta, now - self.retain_s)
        except StoreUnavailable:
            raise  # the commit may have happened: recovery settles the blob, not this call
        except Exception:
            self._delete_quietly([(user_id, version)])  # rolled back: the blob is nobody's
            raise
        failpoint("committed")
        self._delete_quietly(expired)
        return meta

    def meta(self, user_id: str, version: int | None = None) -> AdapterMeta | None:
        """The current version's meta (``version=None``) or a retained older one; None if gone."""
        if version is None:
            return self.index.current(user_id)
        return self.index.version(user_id, version)

    def read(self, meta: AdapterMeta) -> bytes:
        """The blob of ``meta``'s version; ``FileNotFoundError`` if it was collected meanwhile."""
        data = self.blobs.get(meta.user_id, meta.version)
        if data is None:
            raise FileNotFoundError(f"blob {label((meta.user_id, meta.version))} was collected")
        return data

    def remove(self, user_id: str) -> bool:
        """Retire the user's current version (it stays readable ``retain_s``); False if none."""
        now = time.time()
        removed, expired = self.index.retire(user_id, now, now - self.retain_s)
        self._delete_quietly(expired)
        return removed

    def list(self) -> list[AdapterMeta]:
        """Current version of every user, sorted by user id."""
        return self.index.list_current()

    def totals(self) -> tuple[int, int]:
        """(users with a current version, their blobs' bytes): one aggregate query."""
        return self.index.totals()

    def collect_garbage(self, user_id: str | None = None) -> int:
        """Delete versions retired ``retain_s`` ago or more (one user or all); return count."""
        expired = self.index.collect(time.time() - self.retain_s, user_id)
        self.blobs.delete(expired)
        return len(expired)

    def recover(self, validate: BlobValidator, verify_checksums: bool = True) -> RecoveryReport:
        """Reconcile index and blobs after a crash, then collect expired versions; called once
        when the store opens (``adapters_store.recovery``)."""
        reconciler = Reconciler(self.index, self.blobs, validate, self.db.exclusive, self.grace_s)
        report = reconciler.run(verify_checksums)
        self.collect_garbage()
        if not report.clean:
            log.warning("adapter store %s recovered: %s", self.db.description, report)
        return report

    def subscribe(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(user_id)`` from a background thread after any process publishes or
        removes a version of ``user_id``; ``callback(None)`` after the change feed reconnects
        (changes may have been missed: revalidate everything). A directory store has no
        other writer: nothing is ever called."""
        self.db.subscribe(CHANNEL, callback)

    def close(self) -> None:
        """Close the database if this backend opened it. Idempotent."""
        if self._owns_db:
            self.db.close()

    def _delete_quietly(self, keys: Sequence[BlobKey]) -> None:
        """Delete blobs nothing names any more; a failure only leaves garbage for recovery."""
        try:
            self.blobs.delete(keys)
        except Exception as e:  # the publish or remove itself succeeded: do not fail it
            log.warning("could not delete adapter blobs %s (%s); recovery will", keys, e)


class LocalBackend(AdapterBackend):
    """A directory store's adapters on their own: ``<root>/vera.sqlite`` and files under
    ``<root>/adapters`` (``FileBlobs``); the backend owns and closes its database."""

    def __init__(self, root: Path | str, retain_s: float = DEFAULT_RETAIN_S) -> None:
        self.root = Path(root)
        db = SqliteDatabase(self.root)
        self.files = FileBlobs(self.root / "adapters")
        try:
            super().__init__(db, self.files, retain_s, owns_db=True)
        except BaseException:
            db.close()
            raise

    def path(self, user_id: str, version: int) -> Path:
        return self.files.path(user_id, version)


def default_blobs(db: Database) -> BlobStore:
    """Where a store's adapter bytes go: files under ``<dir>/adapters`` beside a directory
    store's database, the ``vera_blobs`` table of a PostgreSQL one."""
    if isinstance(db, SqliteDatabase):
        return FileBlobs(db.directory / "adapters")
    if isinstance(db, PostgresDatabase):
        return PgBlobs(db)
    raise TypeError(f"no default blob store for {type(db).__name__}")


def open_backend(location: Path | str, retain_s: float = DEFAULT_RETAIN_S) -> AdapterBackend:
    """The adapters of the store at ``location`` (a directory or a database URL), on a
    database of their own that ``close`` closes (a server process opens one database for all
    its components instead, and hands it to ``AdapterBackend``)."""
    if not is_database_url(location):
        return LocalBackend(location, retain_s)
    db = open_database(location)
    try:
        return AdapterBackend(db, default_blobs(db), retain_s, owns_db=True)
    except BaseException:
        db.close()
        raise
