"""Where adapter bytes live: the seam between the version index and any byte store.

A ``BlobStore`` keeps immutable blobs addressed by ``(user_id, version)`` and knows nothing of
the index: which version is current, retained or collected is the backend's business
(``adapters_store.backend``, whose publish order makes the index commit the publish point).
Implementations: ``FileBlobs`` (files in the store directory) and ``PgBlobs`` (rows of the
PostgreSQL store). An S3-compatible object store would be one more: a PUT is atomic and durable
when it returns, ``scan`` lists objects with their sizes and ages, ``checksums`` reads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

BlobKey = tuple[str, int]  # (user_id, version)


def label(key: BlobKey) -> str:
    """``user/v<version>``: how reports and messages name a blob."""
    return f"{key[0]}/v{key[1]}"


@dataclass(frozen=True)
class StoredBlob:
    """One stored blob as ``scan`` sees it."""

    key: BlobKey
    bytes: int
    age_s: float  # seconds since it was stored, on the store's own clock


class BlobStore(Protocol):
    """Immutable blobs by ``(user_id, version)``; a key is written once (a key whose version
    was never published may be written again). Thread-safe."""

    def put(self, user_id: str, version: int, data: bytes) -> None:
        """Store ``data``; durable when this returns. Raises if it could not be stored (and
        then leaves nothing but what ``sweep_partial`` removes)."""

    def get(self, user_id: str, version: int) -> bytes | None:
        """The blob, or None if it does not exist (never stored, or deleted)."""

    def delete(self, keys: Sequence[BlobKey]) -> None:
        """Delete these blobs; missing ones are ignored."""

    def scan(self) -> list[StoredBlob]:
        """Every stored blob (recovery)."""

    def checksums(self, keys: Iterable[BlobKey]) -> dict[BlobKey, str]:
        """sha256 hex digests of the existing blobs among ``keys`` (recovery)."""

    def sweep_partial(self, older_than_s: float) -> list[str]:
        """Remove the leftovers of interrupted ``put`` calls older than ``older_than_s``
        seconds; return what was removed (recovery)."""
