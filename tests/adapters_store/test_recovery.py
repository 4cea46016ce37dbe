from __future__ import annotations

import os

import pytest
import torch
from helpers import LAYOUT, LOCAL_ONLY, filled_adapter, random_adapter, stamped_bytes

from adapters_store import AdapterStore, StoreUnavailable
from adapters_store.file_blobs import _write_durably

pytestmark = LOCAL_ONLY  # files and SQLite rows; Postgres recovery: test_postgres.py


def user_dir(store: AdapterStore, user: str):
    return store.backend.root / "adapters" / user


def test_orphan_temp_files_are_removed(open_store) -> None:
    first = open_store()
    first.put("a", random_adapter(1))
    first.close()
    orphan = user_dir(first, "a") / ".tmp-v2-deadbeef"
    orphan.write_bytes(b"half a file")
    second = open_store()
    assert not orphan.exists() and second.recovery.temp_files_removed == [str(orphan)]
    assert second.meta("a").version == 1


def test_row_with_missing_file_is_dropped(open_store) -> None:
    first = open_store()
    first.put("a", random_adapter(1))
    first.put("b", random_adapter(2))
    first.close()
    os.unlink(user_dir(first, "a") / "v1.safetensors")
    second = open_store()
    assert second.recovery.rows_dropped == ["a/v1"]
    assert [m.user_id for m in second.list()] == ["b"]
    assert second.put("a", random_adapter(3)).version == 2  # the counter survived


def test_row_with_corrupt_file_is_dropped_by_checksum(open_store) -> None:
    first = open_store()
    first.put("a", filled_adapter(1.0))
    first.close()
    path = user_dir(first, "a") / "v1.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # same size: only the checksum can tell
    path.write_bytes(bytes(data))
    second = open_store()
    assert second.recovery.rows_dropped == ["a/v1"] and not path.exists()
    assert second.list() == []


def test_complete_file_whose_commit_was_lost_is_adopted(open_store) -> None:
    """Crash between rename and index commit: the new version is complete, so it wins."""
    first = open_store()
    first.put("a", filled_adapter(1.0))
    first.close()
    data = stamped_bytes(filled_adapter(2.0))
    _write_durably(user_dir(first, "a") / "v2.safetensors", data)
    second = open_store()
    assert second.recovery.files_adopted == ["a/v2"]
    assert second.meta("a").version == 2
    assert torch.equal(second.load_flat("a"), torch.full((LAYOUT.num_params,), 2.0))
    assert torch.equal(second.load_flat("a", 1), torch.full((LAYOUT.num_params,), 1.0))
    assert second.put("a", filled_adapter(3.0)).version == 3


def test_file_for_unknown_user_is_adopted_and_invalid_file_removed(open_store) -> None:
    first = open_store()
    first.close()
    user_dir(first, "new").mkdir()
    _write_durably(user_dir(first, "new") / "v1.safetensors", stamped_bytes(filled_adapter(4.0)))
    user_dir(first, "bad").mkdir()
    (user_dir(first, "bad") / "v1.safetensors").write_bytes(b"not safetensors")
    second = open_store()
    assert second.recovery.files_adopted == ["new/v1"]
    assert second.recovery.files_removed == ["bad/v1"]
    assert [m.user_id for m in second.list()] == ["new"]


def test_stale_unindexed_file_is_removed_not_resurrected(open_store) -> None:
    """A file older than the user's newest row (e.g. a lost concurrent put) is garbage."""
    first = open_store()
    first.put("a", filled_adapter(1.0))
    first.put("a", filled_adapter(2.0))
    first.close()
    stale = user_dir(first, "a") / "v0.safetensors"
    stale.write_bytes(stamped_bytes(filled_adapter(9.0)))
    second = open_store()
    assert second.recovery.files_removed == ["a/v0"] and not stale.exists()
    assert second.meta("a").version == 2


def test_deleted_user_is_not_resurrected_by_its_retained_file(open_store) -> None:
    first = open_store()
    first.put("a", filled_adapter(1.0))
    first.delete("a")
    first.close()
    second = open_store()
    assert second.recovery.clean and second.list() == []


def test_blob_left_by_a_crash_after_collecting_its_row_is_not_resurrected(
    open_store, monkeypatch
) -> None:
    """Collection deletes rows, then blobs after the commit: a crash in between leaves a blob
    newer than every remaining row of a removed user, which must not come back."""
    first = open_store(retain_s=0.0)
    first.put("a", filled_adapter(1.0))
    monkeypatch.setattr(first.backend.blobs, "delete", lambda keys: None)  # the crash
    assert first.delete("a")
    first.close()
    assert (user_dir(first, "a") / "v1.safetensors").exists()
    second = open_store(retain_s=0.0)
    assert second.recovery.files_removed == ["a/v1"] and second.list() == []
    assert second.put("a", filled_adapter(2.0)).version == 2


def test_publish_after_a_removal_whose_commit_was_lost_is_adopted(open_store) -> None:
    first = open_store(retain_s=0.0)
    first.put("a", filled_adapter(1.0))
    first.delete("a")
    first.close()
    _write_durably(user_dir(first, "a") / "v2.safetensors", stamped_bytes(filled_adapter(2.0)))
    second = open_store()
    assert second.recovery.files_adopted == ["a/v2"] and second.meta("a").version == 2


def test_a_publish_whose_commit_outcome_is_unknown_keeps_its_file(open_store, monkeypatch) -> None:
    """StoreUnavailable from the index commit may mean it committed: the file stays, and the
    next open settles it (here the commit did not happen, so the complete file is adopted)."""
    first = open_store()
    first.put("a", filled_adapter(1.0))

    def unknown(*args) -> None:
        raise StoreUnavailable("the store database failed to commit (test)")

    monkeypatch.setattr(first.backend.index, "commit", unknown)
    with pytest.raises(StoreUnavailable):
        first.put("a", filled_adapter(2.0))
    assert (user_dir(first, "a") / "v2.safetensors").exists()
    first.close()
    second = open_store()
    assert second.recovery.files_adopted == ["a/v2"] and second.meta("a").version == 2
