"""The storage backend contract: versioned blobs plus an index of the current version per user.

The ``AdapterStore`` validates and (de)serializes adapters; a backend only moves bytes and keeps
the index. Two backends implement it: ``LocalBackend`` (a directory plus SQLite, one server
process) and ``PostgresBackend`` (index and blobs in PostgreSQL, shared by server replicas).

Guarantees every backend gives:

1. A version number is never reused for a user, even after ``remove`` (the residency tiers key
   cached copies by ``(user_id, version)``). A version that was never visible (its publish
   failed or crashed before the publish point) may be handed out again: nobody cached it.
2. ``publish`` makes the blob durable *before* the index names it, so a crash leaves either the
   previous or the new version current, never a torn one.
3. A superseded or removed version stays readable for ``retain_s`` seconds (running requests and
   loaders keep the version they started with), then ``collect_garbage`` deletes it.
4. Calls that cannot reach a shared backend raise ``StoreUnavailable`` within a few seconds.

How ``PostgresBackend`` meets them: (1) a ``vera_counters`` row per user, never deleted,
incremented with ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``; (2) the blob row, the index
row and the retirement of the previous current row are written in one transaction whose COMMIT
is the publish point (WAL fsync'd); (3) retired rows keep their blob until a publish/remove of
that user, ``collect_garbage`` or ``recover`` runs after ``retain_s``; (4) a small connection pool
with short timeouts. ``subscribe`` follows ``NOTIFY vera_adapters`` so replicas drop stale copies.

An S3-compatible object store under the PostgreSQL index replaces only its ``BlobStore``
(``adapters_store.blobs``): ``publish`` reserves the version in its own short transaction,
PUTs ``<prefix>/<user>/v<version>.safetensors`` (an object PUT is atomic and durable when it
returns), then commits the index row in one transaction that retires the previous current row,
so the commit stays the publish point. ``read`` is a GET of that key; ``collect_garbage``
deletes the rows, then the objects (a crash in between leaves unindexed objects); ``recover``
lists objects without rows older than an in-flight publish could be and deletes them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters_store.meta import AdapterMeta

DEFAULT_RETAIN_S = 300.0  # how long a superseded or removed version stays readable

# data -> (num_params, base_fingerprint); raises a VeraError when the blob is not adoptable
BlobValidator = Callable[[bytes], tuple[int, str]]


@dataclass
class RecoveryReport:
    """What ``recover`` found and fixed; each list holds ``"user/v<version>"`` labels or paths.

    For ``PostgresBackend`` "files" are blobs: ``files_removed`` lists blobs no row names, and
    ``temp_files_removed`` / ``files_adopted`` stay empty (blob and row commit together).
    """

    temp_files_removed: list[str] = field(default_factory=list)
    rows_dropped: list[str] = field(default_factory=list)  # index row, file missing or corrupt
    files_adopted: list[str] = field(default_factory=list)  # complete file, index commit lost
    files_removed: list[str] = field(default_factory=list)  # unindexed and stale or invalid

    @property
    def clean(self) -> bool:
        return not (
            self.temp_files_removed or self.rows_dropped or self.files_adopted or self.files_removed
        )


class AdapterBackend(ABC):
    """Versioned adapter blobs with a per-user current-version index. Thread-safe."""

    @abstractmethod
    def publish(
        self, user_id: str, data: bytes, sha256: str, num_params: int, base_fingerprint: str
    ) -> AdapterMeta:
        """Store ``data`` durably as the user's next version and make it current; return it."""

    @abstractmethod
    def meta(self, user_id: str, version: int | None = None) -> AdapterMeta | None:
        """The current version's meta (``version=None``) or a retained older one; None if gone."""

    @abstractmethod
    def read(self, meta: AdapterMeta) -> bytes:
        """The blob of ``meta``'s version; ``FileNotFoundError`` if it was collected meanwhile."""

    @abstractmethod
    def remove(self, user_id: str) -> bool:
        """Retire the user's current version (it stays readable ``retain_s``); False if none."""

    @abstractmethod
    def list(self) -> list[AdapterMeta]:
        """Current version of every user, sorted by user id."""

    @abstractmethod
    def totals(self) -> tuple[int, int]:
        """(users with a current version, their blobs' bytes): one aggregate query."""

    @abstractmethod
    def collect_garbage(self, user_id: str | None = None) -> int:
        """Delete blobs retired longer than ``retain_s`` ago (one user or all); return count."""

    @abstractmethod
    def recover(self, validate: BlobValidator, verify_checksums: bool = True) -> RecoveryReport:
        """Reconcile index and blobs after a crash; called once when the store opens."""

    def subscribe(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(user_id)`` from a background thread after any process publishes or
        removes a version of ``user_id``; ``callback(None)`` after the change feed reconnects
        (changes may have been missed: revalidate everything). Default: no-op (one writer)."""
        return None  # only this process writes a local store: it invalidates its own copies

    @abstractmethod
    def close(self) -> None:
        """Release connections and file handles. Idempotent."""
