"""The storage backend contract: versioned blobs plus an index of the current version per user.

The ``AdapterStore`` validates and (de)serializes adapters; a backend only moves bytes and keeps
the index. The local backend (``LocalBackend``: a directory plus SQLite) is the default. A shared
backend for several server replicas implements the same six methods, for example:

* S3-compatible object store + PostgreSQL index: ``publish`` reserves the version with
  ``UPDATE counters ... RETURNING``, uploads ``<prefix>/<user>/v<version>.safetensors`` (an
  object PUT is atomic), then commits the index row in one transaction that retires the previous
  current row. ``read`` is a GET of that key; ``collect_garbage`` deletes objects of rows retired
  longer than the retention period; ``recover`` lists objects without rows.

Guarantees every backend gives:

1. A version number is never reused for a user, even after ``remove`` (the residency tiers key
   cached copies by ``(user_id, version)``).
2. ``publish`` makes the blob durable *before* the index names it, so a crash leaves either the
   previous or the new version current, never a torn one.
3. A superseded or removed version stays readable for ``retain_s`` seconds (running requests and
   loaders keep the version they started with), then ``collect_garbage`` deletes it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters_store.meta import AdapterMeta

# data -> (num_params, base_fingerprint); raises a VeraError when the blob is not adoptable
BlobValidator = Callable[[bytes], tuple[int, str]]


@dataclass
class RecoveryReport:
    """What ``recover`` found and fixed; each list holds ``"user/v<version>"`` labels or paths."""

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
    def collect_garbage(self, user_id: str | None = None) -> int:
        """Delete blobs retired longer than ``retain_s`` ago (one user or all); return count."""

    @abstractmethod
    def recover(self, validate: BlobValidator, verify_checksums: bool = True) -> RecoveryReport:
        """Reconcile index and blobs after a crash; called once when the store opens."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and file handles."""
