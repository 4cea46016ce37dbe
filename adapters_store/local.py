"""The embedded default backend: ``<root>/adapters/<user_id>/v<version>.safetensors`` + SQLite.

Write protocol of ``publish`` (each step durable before the next, so a crash at any instant
leaves the previous or the new version current, never a torn one):

1. reserve the version number in the index (committed; a crash later leaves only a gap);
2. write ``.tmp-v<version>-<random>`` in the user's directory, fsync it;
3. rename it to ``v<version>.safetensors``, fsync the directory;
4. commit the index row that makes it current and retires the previous one.

Retention policy: a superseded or deleted version's file stays readable for ``retain_s``
seconds after it was retired (default 300 s), so requests that resolved it keep working; it is
then deleted by ``collect_garbage``, which runs after every publish/remove of that user and on
start. Recovery on start: temp files are removed; index rows whose file is missing or fails
its checksum are dropped (the file too); a complete file newer than every row of its user
(crash between steps 3 and 4) is validated and adopted; any other unindexed file is removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from pathlib import Path

from adapters_store.backend import (
    DEFAULT_RETAIN_S,
    AdapterBackend,
    BlobValidator,
    RecoveryReport,
)
from adapters_store.ids import validate_user_id
from adapters_store.local_index import SqliteIndex
from adapters_store.meta import AdapterMeta
from vera_core.errors import VeraError

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"
_FILE_RE = re.compile(r"v(\d+)\.safetensors")


def failpoint(name: str) -> None:
    """No-op in production; crash tests replace it to stop a writer at a named step."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """temp file + fsync + rename + directory fsync: ``path`` appears complete or not at all."""
    if not path.parent.is_dir():
        path.parent.mkdir(exist_ok=True)
        _fsync_dir(path.parent.parent)  # the new user directory's entry must survive too
    tmp = path.with_name(f"{_TMP_PREFIX}{path.stem}-{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        failpoint("tmp_written")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)  # e.g. disk full: leave nothing behind
        raise
    os.close(fd)
    failpoint("tmp_synced")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    failpoint("renamed")


class LocalBackend(AdapterBackend):
    """Adapter files in a local directory, indexed by SQLite in WAL mode. Thread-safe."""

    def __init__(self, root: Path | str, retain_s: float = DEFAULT_RETAIN_S) -> None:
        self.root = Path(root)
        self.retain_s = retain_s
        self._files = self.root / "adapters"
        self._files.mkdir(parents=True, exist_ok=True)
        self._index = SqliteIndex(self.root / "index.sqlite")

    def path(self, user_id: str, version: int) -> Path:
        return self._files / validate_user_id(user_id) / f"v{version}.safetensors"

    def publish(
        self, user_id: str, data: bytes, sha256: str, num_params: int, base_fingerprint: str
    ) -> AdapterMeta:
        version = self._index.reserve_version(validate_user_id(user_id))
        _write_durably(self.path(user_id, version), data)
        now = time.time()
        meta = AdapterMeta(user_id, version, len(data), num_params, sha256, now, base_fingerprint)
        self._index.commit_version(meta, now)
        failpoint("committed")
        self.collect_garbage(user_id)
        return meta

    def meta(self, user_id: str, version: int | None = None) -> AdapterMeta | None:
        if version is None:
            return self._index.current(user_id)
        return self._index.version(user_id, version)

    def read(self, meta: AdapterMeta) -> bytes:
        return self.path(meta.user_id, meta.version).read_bytes()

    def remove(self, user_id: str) -> bool:
        removed = self._index.retire_current(validate_user_id(user_id), time.time())
        self.collect_garbage(user_id)
        return removed

    def list(self) -> list[AdapterMeta]:
        return self._index.list_current()

    def totals(self) -> tuple[int, int]:
        return self._index.totals()

    def collect_garbage(self, user_id: str | None = None) -> int:
        expired = self._index.expired(time.time() - self.retain_s, user_id)
        for uid, version in expired:  # file first: a crash in between leaves a row to drop
            self.path(uid, version).unlink(missing_ok=True)
        self._index.drop_rows(expired)
        return len(expired)

    def close(self) -> None:
        self._index.close()  # idempotent

    def recover(self, validate: BlobValidator, verify_checksums: bool = True) -> RecoveryReport:
        report = RecoveryReport()
        files = self._scan_files(report)
        newest: dict[str, int] = {}  # newest version with a row, current or retired
        dropped: list[tuple[str, int]] = []
        for meta, retired_at in self._index.all_rows():
            key = (meta.user_id, meta.version)
            path = files.pop(key, None)
            check = retired_at is None and verify_checksums
            if path is not None and _file_matches(path, meta, check):
                newest[meta.user_id] = max(newest.get(meta.user_id, 0), meta.version)
                continue
            dropped.append(key)
            if path is not None:
                path.unlink()
            if retired_at is None:
                report.rows_dropped.append(f"{key[0]}/v{key[1]}")
        self._index.drop_rows(dropped)
        for (uid, version), path in sorted(files.items()):
            self._adopt_or_remove(uid, version, path, newest, validate, report)
        self.collect_garbage()
        if not report.clean:
            log.warning("adapter store recovered: %s", report)
        return report

    def _scan_files(self, report: RecoveryReport) -> dict[tuple[str, int], Path]:
        """Remove temp files; return {(user_id, version): path} of the version files."""
        files: dict[tuple[str, int], Path] = {}
        for user_dir in os.scandir(self._files):
            if not user_dir.is_dir() or not _is_valid_id(user_dir.name):
                continue
            for entry in os.scandir(user_dir.path):
                if entry.name.startswith(_TMP_PREFIX):
                    os.unlink(entry.path)
                    report.temp_files_removed.append(entry.path)
                elif m := _FILE_RE.fullmatch(entry.name):
                    files[(user_dir.name, int(m.group(1)))] = Path(entry.path)
        return files

    def _adopt_or_remove(
        self,
        uid: str,
        version: int,
        path: Path,
        newest: dict[str, int],
        validate: BlobValidator,
        report: RecoveryReport,
    ) -> None:
        """An unindexed version file: adopt it if newer than every row of its user and valid
        (its publish crashed between rename and index commit); otherwise delete it."""
        label = f"{uid}/v{version}"
        if version > newest.get(uid, 0):
            data = path.read_bytes()
            try:
                num_params, fingerprint = validate(data)
            except VeraError as e:
                log.warning("adapter file %s is invalid (%s): removing it", path, e)
            else:
                sha = hashlib.sha256(data).hexdigest()
                created = path.stat().st_mtime
                meta = AdapterMeta(uid, version, len(data), num_params, sha, created, fingerprint)
                self._index.bump_counter(uid, version)
                self._index.commit_version(meta, time.time())
                newest[uid] = version
                report.files_adopted.append(label)
                return
        path.unlink()
        report.files_removed.append(label)


def _is_valid_id(name: str) -> bool:
    try:
        validate_user_id(name)
    except ValueError:
        return False
    return True


def _file_matches(path: Path, meta: AdapterMeta, verify_checksum: bool) -> bool:
    """Size always; sha256 too when ``verify_checksum``."""
    try:
        if path.stat().st_size != meta.bytes:
            return False
        return not verify_checksum or hashlib.sha256(path.read_bytes()).hexdigest() == meta.sha256
    except OSError:
        return False
