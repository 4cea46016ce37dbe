"""Crash recovery of adapter versions: the index and the blobs reconciled when a store opens.

Rows are read first, then blobs are listed: a row committed before the listing has its blob in
it (a blob is stored before its row commits and deleted only after its row), so a row whose
blob is missing from the listing really lost it. Then:

* A row whose blob is missing or has the wrong size, or (a current row, with
  ``verify_checksums``) the wrong sha256, is dropped with its blob; ``rows_dropped`` names the
  current ones (the user falls back to no adapter, never to a damaged one).
* Leftovers of interrupted puts (temp files) are removed: all of them in an exclusive store,
  those older than ``grace_s`` in a shared one.
* A blob that no row names, in an exclusive store (a directory: this process is its only
  writer, and no publish runs while it opens), is adopted if its version is above every row of
  its user and above the user's last committed version (its publish crashed between the blob
  write and the index commit, so it is the newest complete version) and it validates; any
  other is deleted. The last committed version keeps a blob whose row was collected from coming
  back: garbage collection deletes rows first and blobs after the commit.
* In a shared store another replica may be between its blob write and its index commit right
  now, so an unindexed blob is never adopted there, and deleted only once it is older than
  ``grace_s`` (far longer than any publish takes) and still has no row.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters_store.blobs import BlobKey, BlobStore, StoredBlob, label
from adapters_store.meta import AdapterMeta
from adapters_store.version_index import VersionIndex
from vera_core.errors import VeraError

log = logging.getLogger(__name__)

# data -> (num_params, base_fingerprint); raises a VeraError when the blob is not adoptable
BlobValidator = Callable[[bytes], tuple[int, str]]


@dataclass
class RecoveryReport:
    """What ``recover`` found and fixed; each list holds ``"user/v<version>"`` labels, or the
    paths of temp files. "Files" are blobs, whatever store holds them."""

    temp_files_removed: list[str] = field(default_factory=list)
    rows_dropped: list[str] = field(default_factory=list)  # current row, blob missing or corrupt
    files_adopted: list[str] = field(default_factory=list)  # complete blob, index commit lost
    files_removed: list[str] = field(default_factory=list)  # unindexed and stale or invalid

    @property
    def clean(self) -> bool:
        return not (
            self.temp_files_removed or self.rows_dropped or self.files_adopted or self.files_removed
        )


@dataclass(frozen=True)
class Reconciler:
    """One recovery pass over ``index`` and ``blobs`` (see the module docstring)."""

    index: VersionIndex
    blobs: BlobStore
    validate: BlobValidator
    exclusive: bool
    grace_s: float

    def run(self, verify_checksums: bool) -> RecoveryReport:
        report = RecoveryReport()
        report.temp_files_removed = self.blobs.sweep_partial(
            0.0 if self.exclusive else self.grace_s
        )
        rows = self.index.rows()
        stored = {blob.key: blob for blob in self.blobs.scan()}
        bad = self._unsound(rows, stored, verify_checksums)
        dropped = self.index.drop(bad)
        report.rows_dropped = sorted(
            label(key) for key, retired_at in dropped if retired_at is None
        )
        self.blobs.delete([key for key in bad if key in stored])
        indexed = {(meta.user_id, meta.version) for meta, _ in rows}
        unindexed = sorted(set(stored) - indexed)
        if self.exclusive:
            newest: dict[str, int] = {}  # user -> newest version with a sound row
            for user_id, version in indexed - set(bad):
                newest[user_id] = max(newest.get(user_id, 0), version)
            floor = self.index.last_committed()
            for key in unindexed:
                above = max(newest.get(key[0], 0), floor.get(key[0], 0))
                self._adopt_or_remove(stored[key], above, newest, report)
        else:
            old = [key for key in unindexed if stored[key].age_s >= self.grace_s]
            gone = sorted(set(old) - self.index.indexed(old))  # committed meanwhile: keep
            self.blobs.delete(gone)
            report.files_removed = [label(key) for key in gone]
        return report

    def _unsound(
        self,
        rows: list[tuple[AdapterMeta, float | None]],
        stored: dict[BlobKey, StoredBlob],
        verify_checksums: bool,
    ) -> list[BlobKey]:
        """Rows whose blob is missing, the wrong size, or (current rows) the wrong sha256."""
        bad, expected = [], {}
        for meta, retired_at in rows:
            key = (meta.user_id, meta.version)
            blob = stored.get(key)
            if blob is None or blob.bytes != meta.bytes:
                bad.append(key)
            elif verify_checksums and retired_at is None:
                expected[key] = meta.sha256
        sums = self.blobs.checksums(expected) if expected else {}
        bad += [key for key, sha in expected.items() if sums.get(key) != sha]
        return sorted(bad)

    def _adopt_or_remove(
        self, blob: StoredBlob, above: int, newest: dict[str, int], report: RecoveryReport
    ) -> None:
        """Adopt an unindexed blob of an exclusive store if its version is above ``above`` and
        it validates (its publish crashed before the index commit); delete it otherwise."""
        (user_id, version), name = blob.key, label(blob.key)
        data = self.blobs.get(user_id, version) if version > above else None
        if data is not None:
            try:
                num_params, fingerprint = self.validate(data)
            except VeraError as e:
                log.warning("adapter blob %s is invalid (%s): removing it", name, e)
            else:
                sha = hashlib.sha256(data).hexdigest()
                created = time.time() - blob.age_s
                meta = AdapterMeta(
                    user_id, version, len(data), num_params, sha, created, fingerprint
                )
                self.index.adopt(meta, time.time())
                newest[user_id] = version
                report.files_adopted.append(name)
                return
        self.blobs.delete([blob.key])
        report.files_removed.append(name)
