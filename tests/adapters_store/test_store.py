from __future__ import annotations

import hashlib
import time
from dataclasses import replace

import pytest
import torch
from helpers import (
    FP,
    LAYOUT,
    LOCAL_ONLY,
    blob_versions,
    filled_adapter,
    flip_last_byte,
    header,
    random_adapter,
    read_adapter,
    stored_users,
)

from adapters_store import AdapterNotFound, AdapterStore, StoreCorruptError
from vera_core import Adapter, AdapterFormatError, AdapterMismatchError, AdapterValueError
from vera_core.adapter_file import adapter_from_bytes, adapter_to_bytes


def test_put_get_roundtrip_and_metadata(store: AdapterStore) -> None:
    adapter = random_adapter(1)
    before = time.time()
    meta = store.put("alice", adapter)
    got, got_meta = read_adapter(store, "alice")
    assert got_meta == meta == store.meta("alice")
    assert (meta.user_id, meta.version, meta.num_params) == ("alice", 1, LAYOUT.num_params)
    assert meta.base_fingerprint == FP and before <= meta.created_at <= time.time()
    data = store.backend.read(meta)
    assert meta.bytes == len(data) and meta.sha256 == hashlib.sha256(data).hexdigest()
    assert adapter_from_bytes(data).header.base_fingerprint == FP  # file is vera_core format
    assert torch.equal(got.flat(LAYOUT), adapter.flat(LAYOUT))
    assert torch.equal(store.load_flat("alice"), adapter.flat(LAYOUT))
    assert meta.to_dict()["sha256"] == meta.sha256


def test_versions_increment_and_survive_delete(store: AdapterStore) -> None:
    assert [store.put("bob", random_adapter(i)).version for i in range(3)] == [1, 2, 3]
    assert store.delete("bob") is True and store.delete("bob") is False
    with pytest.raises(AdapterNotFound):
        store.load_flat("bob")
    assert store.put("bob", random_adapter(9)).version == 4  # never reused


def test_old_version_readable_until_retention_expires(open_store) -> None:
    store = open_store(retain_s=60.0)
    a1, a2 = random_adapter(1), random_adapter(2)
    store.put("u", a1)
    store.put("u", a2)
    assert torch.equal(store.load_flat("u", 1), a1.flat(LAYOUT))  # a running request's copy
    assert torch.equal(store.load_flat("u"), a2.flat(LAYOUT))
    assert blob_versions(store.backend, "u") == [1, 2]
    store.backend.retain_s = 0.0
    assert store.backend.collect_garbage("u") == 1
    assert blob_versions(store.backend, "u") == [2]
    with pytest.raises(AdapterNotFound, match="version 1"):
        store.load_flat("u", 1)


def test_zero_retention_collects_on_put_and_delete(open_store) -> None:
    store = open_store(retain_s=0.0)
    for i in range(5):
        store.put("c", random_adapter(i))
    assert blob_versions(store.backend, "c") == [5]
    store.delete("c")
    assert blob_versions(store.backend, "c") == []


def test_list_and_not_found(store: AdapterStore) -> None:
    for user in ["zed", "amy", "kim"]:
        store.put(user, random_adapter(len(user)))
    store.delete("kim")
    assert [m.user_id for m in store.list()] == ["amy", "zed"]
    with pytest.raises(AdapterNotFound) as info:
        store.meta("kim")
    assert isinstance(info.value, KeyError) and "kim" in str(info.value)
    with pytest.raises(AdapterNotFound):
        store.load_flat("nobody")


def mutate(adapter: Adapter, layer: int, d: torch.Tensor | None = None, b=None) -> Adapter:
    vectors = dict(adapter.vectors)
    name = LAYOUT.layers[layer].name
    old_d, old_b = vectors[name]
    vectors[name] = (old_d if d is None else d, old_b if b is None else b)
    return Adapter(adapter.header, vectors)


def wrong_r() -> Adapter:
    from vera_core import Layout

    return random_adapter(0, Layout(4, LAYOUT.layers))


def nan_adapter() -> Adapter:
    return mutate(random_adapter(0), 1, b=torch.tensor([1.0, float("nan"), 0.0, 0.0]))


def missing_layer() -> Adapter:
    vectors = dict(random_adapter(0).vectors)
    vectors.pop(LAYOUT.layers[3].name)
    return Adapter(header(), vectors)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (wrong_r, AdapterMismatchError, "r=4"),
        (lambda: Adapter(header(key=7), random_adapter(0).vectors), AdapterMismatchError, "key"),
        (lambda: mutate(random_adapter(0), 0, b=torch.zeros(15)), AdapterMismatchError, "shape"),
        (lambda: mutate(random_adapter(0), 2, d=torch.zeros(9)), AdapterMismatchError, "shape"),
        (missing_layer, AdapterMismatchError, "missing"),
        (
            lambda: Adapter(header(fingerprint="other"), random_adapter(0).vectors),
            AdapterMismatchError,
            "base model",
        ),
        (nan_adapter, AdapterValueError, "NaN"),
        (lambda: mutate(random_adapter(0), 0, d=torch.full((8,), 1e9)), AdapterValueError, "value"),
    ],
)
def test_mismatched_adapters_rejected_before_writing(store, make, error, match) -> None:
    with pytest.raises(error, match=match):
        store.put("eve", make())
    assert store.list() == [] and stored_users(store.backend) == set()


@pytest.mark.parametrize(
    "data", [b"", b"garbage!" * 10, adapter_to_bytes(random_adapter(0))[:-7], b"\xff" * 8 + b"{}"]
)
def test_bad_files_raise_format_errors(data: bytes) -> None:
    with pytest.raises(AdapterFormatError):
        adapter_from_bytes(data)


def test_damaged_file_is_detected_on_read(store: AdapterStore) -> None:
    store.put("dan", filled_adapter(0.5))
    flip_last_byte(store.backend, "dan", 1)
    for version in (None, 1):
        with pytest.raises(StoreCorruptError, match="sha256"):
            store.load_flat("dan", version)


def test_peft_style_header_gets_the_server_fingerprint(store: AdapterStore) -> None:
    adapter = random_adapter(3)
    unknown = Adapter(replace(adapter.header, base_fingerprint=""), adapter.vectors)
    assert store.put("p", unknown).base_fingerprint == FP
    assert read_adapter(store, "p")[0].header.base_fingerprint == FP


def test_half_precision_upload_loads_as_float32(store: AdapterStore) -> None:
    adapter = random_adapter(4)
    half = Adapter(
        adapter.header, {k: (d.half(), b.half()) for k, (d, b) in adapter.vectors.items()}
    )
    store.put("h", half)
    flat = store.load_flat("h")
    assert flat.dtype == torch.float32 and torch.equal(flat, half.flat(LAYOUT, torch.float32))


def test_reopen_keeps_everything(open_store) -> None:
    first = open_store()
    metas = [first.put(f"user{i}", random_adapter(i)) for i in range(5)]
    first.close()
    second = open_store()
    assert second.recovery.clean and second.list() == metas
    assert second.put("user0", random_adapter(99)).version == 2


@LOCAL_ONLY  # fails the local backend's fsync and looks for its temp files
def test_failed_write_leaves_old_version_and_no_temp_file(store: AdapterStore, monkeypatch) -> None:
    store.put("w", filled_adapter(1.0))

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("adapters_store.file_blobs.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.put("w", filled_adapter(2.0))
    monkeypatch.undo()
    assert blob_versions(store.backend, "w") == [1]
    assert store.meta("w").version == 1 and store.load_flat("w")[0].item() == 1.0
    assert store.put("w", filled_adapter(3.0)).version == 3  # v2 stays a gap, never reused
