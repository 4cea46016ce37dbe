"""Adapter bytes as files: ``<root>/<user_id>/v<version>.safetensors`` (a directory store).

``put`` writes ``.tmp-v<version>-<random>`` in the user's directory, fsyncs it, renames it to
its final name and fsyncs the directory (and a new user directory's parent): the file appears
complete or not at all, and is on disk when ``put`` returns. A failed ``put`` removes its temp
file; a crash leaves one, which ``sweep_partial`` removes. The user id becomes a path here, so
it is checked once more, as a path-safety rule: ids that could escape ``root`` are refused.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from adapters_store.blobs import BlobKey, StoredBlob
from adapters_store.ids import validate_user_id

_TMP_PREFIX = ".tmp-"
_FILE_RE = re.compile(r"v(\d+)\.safetensors")


def failpoint(name: str) -> None:
    """No-op in production; crash tests replace it to stop a writer at a named step."""


class FileBlobs:
    """Blobs as files under ``root`` (see the module docstring). Thread-safe."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, user_id: str, version: int) -> Path:
        """The file of that version; InvalidUserId for an id that is not a safe file name."""
        return self.root / validate_user_id(user_id) / f"v{version}.safetensors"

    def put(self, user_id: str, version: int, data: bytes) -> None:
        _write_durably(self.path(user_id, version), data)

    def get(self, user_id: str, version: int) -> bytes | None:
        try:
            return self.path(user_id, version).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, keys: Sequence[BlobKey]) -> None:
        for user_id, version in keys:
            self.path(user_id, version).unlink(missing_ok=True)

    def scan(self) -> list[StoredBlob]:
        now = time.time()
        found = []
        for user_id, entry in self._entries():
            if (m := _FILE_RE.fullmatch(entry.name)) and (stat := _stat(entry)) is not None:
                key = (user_id, int(m.group(1)))
                found.append(StoredBlob(key, stat.st_size, now - stat.st_mtime))
        return found

    def checksums(self, keys: Iterable[BlobKey]) -> dict[BlobKey, str]:
        sums = {}
        for key in keys:
            data = self.get(*key)
            if data is not None:
                sums[key] = hashlib.sha256(data).hexdigest()
        return sums

    def sweep_partial(self, older_than_s: float) -> list[str]:
        """Temp files of interrupted puts; 0 when no put can be running (this process's
        store is opening)."""
        now, removed = time.time(), []
        for _, entry in self._entries():
            if not entry.name.startswith(_TMP_PREFIX) or (stat := _stat(entry)) is None:
                continue
            if now - stat.st_mtime >= older_than_s:
                Path(entry.path).unlink(missing_ok=True)
                removed.append(entry.path)
        return removed

    def _entries(self) -> Iterable[tuple[str, os.DirEntry]]:
        """(user_id, entry) of every file in a user directory (other names are not ours)."""
        for user_dir in os.scandir(self.root):
            if user_dir.is_dir() and _is_user_id(user_dir.name):
                for entry in os.scandir(user_dir.path):
                    if entry.is_file():
                        yield user_dir.name, entry


def _stat(entry: os.DirEntry) -> os.stat_result | None:
    try:
        return entry.stat()
    except FileNotFoundError:  # deleted since the directory was listed
        return None


def _is_user_id(name: str) -> bool:
    try:
        validate_user_id(name)
    except ValueError:
        return False
    return True


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
