"""Tiny layout and adapters for store tests (no model needed); importable by subprocesses."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch

from adapters_store import (
    AdapterBackend,
    AdapterMeta,
    AdapterNotFound,
    AdapterStore,
    LocalBackend,
)
from adapters_store.pg_database import PostgresDatabase
from vera_core import Adapter, AdapterHeader, LayerSpec, Layout
from vera_core.adapter_file import adapter_from_bytes

R, KEY, FP = 8, 0, "tiny-model-fingerprint"
LAYOUT = Layout(
    r=R,
    layers=(
        LayerSpec("model.layers.0.self_attn.q_proj", 16, 16),
        LayerSpec("model.layers.0.self_attn.v_proj", 16, 4),
        LayerSpec("model.layers.1.self_attn.q_proj", 16, 16),
        LayerSpec("model.layers.1.self_attn.v_proj", 16, 4),
    ),
)


def header(r: int = R, key: int = KEY, fingerprint: str = FP) -> AdapterHeader:
    return AdapterHeader(r, key, ("q_proj", "v_proj"), fingerprint)


def random_adapter(seed: int, layout: Layout = LAYOUT) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(layout.num_params, generator=g)
    return Adapter.from_flat(header(layout.r), layout, flat)


def filled_adapter(value: float, layout: Layout = LAYOUT) -> Adapter:
    """Every number equals ``value``: a torn or mixed file cannot pass for a written one."""
    return Adapter.from_flat(header(layout.r), layout, torch.full((layout.num_params,), value))


def stamped_bytes(adapter: Adapter) -> bytes:
    """The exact file ``AdapterStore.put`` would write for ``adapter``."""
    from dataclasses import replace

    from vera_core.adapter_file import adapter_to_bytes

    return adapter_to_bytes(Adapter(replace(adapter.header, base_fingerprint=FP), adapter.vectors))


def read_adapter(store: AdapterStore, user_id: str) -> tuple[Adapter, AdapterMeta]:
    """The user's current adapter, parsed whole, and its meta; its bytes match their sha256.
    Looks again when the version was collected between the lookup and the read."""
    for _ in range(3):
        meta = store.meta(user_id)
        try:
            data = store.backend.read(meta)
        except FileNotFoundError:
            continue
        assert hashlib.sha256(data).hexdigest() == meta.sha256, "damaged bytes were served"
        return adapter_from_bytes(data), meta
    raise AdapterNotFound(f"{user_id}: collected three times while being read")


def execute(backend: AdapterBackend, query: str, args: tuple = ()) -> list[tuple]:
    """Run one statement on a PostgreSQL backend's database; its rows (none for DML)."""
    assert isinstance(backend.db, PostgresDatabase)
    with backend.db.pool.connection() as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description else []


# Narrows the conftest's backend_kind to the local backend: the test looks at files on disk.
LOCAL_ONLY = pytest.mark.parametrize("backend_kind", ["local"])


def blob_versions(backend: AdapterBackend, user: str) -> list[int]:
    """Versions of ``user`` whose bytes are still stored (files, or rows of vera_blobs)."""
    if not isinstance(backend, LocalBackend):
        sql = "SELECT version FROM vera_blobs WHERE user_id = %s ORDER BY 1"
        return [v for (v,) in execute(backend, sql, (user,))]
    user_dir = backend.root / "adapters" / user
    names = [p.name for p in user_dir.iterdir()] if user_dir.is_dir() else []
    assert all(re.fullmatch(r"v\d+\.safetensors", n) for n in names), names  # no temp files
    return sorted(int(n[1:].split(".")[0]) for n in names)


def flip_last_byte(backend: AdapterBackend, user: str, version: int) -> None:
    """Damage one stored byte of that version, keeping its size (only a checksum can tell)."""
    if not isinstance(backend, LocalBackend):
        execute(
            backend,
            "UPDATE vera_blobs SET data = overlay(data placing "
            "decode(lpad(to_hex(get_byte(data, length(data) - 1) # 255), 2, '0'), 'hex') "
            "from length(data)) WHERE user_id = %s AND version = %s",
            (user, version),
        )
        return
    path = backend.path(user, version)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def stored_users(backend: AdapterBackend) -> set[str]:
    """Users with anything stored: a counter, an index row or a blob (a directory, locally)."""
    if not isinstance(backend, LocalBackend):
        sql = (
            "SELECT user_id FROM vera_counters UNION SELECT user_id FROM vera_versions "
            "UNION SELECT user_id FROM vera_blobs"
        )
        return {u for (u,) in execute(backend, sql)}
    return {p.name for p in (backend.root / "adapters").iterdir()}
