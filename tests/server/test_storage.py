"""open_storage: one database per store, handed to adapters, API keys and fine-tuning jobs."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "adapters_store"))

from helpers import FP, KEY, LAYOUT, filled_adapter  # noqa: E402

from adapters_store import AdapterStore, FileBlobs, LocalBackend, PgBlobs  # noqa: E402
from adapters_store.pg_database import PostgresDatabase  # noqa: E402
from adapters_store.sqlite_database import SqliteDatabase  # noqa: E402
from server.storage import open_storage  # noqa: E402


def new_job(storage) -> str:
    return storage.jobs.create_job("erin", "base", "file-x", None, {}, None).id


def test_a_directory_is_one_sqlite_file_beside_the_adapter_files(tmp_path: Path) -> None:
    storage = open_storage(tmp_path / "store")
    assert isinstance(storage.db, SqliteDatabase) and storage.db.exclusive
    assert storage.adapters.db is storage.db and isinstance(storage.adapters.blobs, FileBlobs)
    assert storage.description == str(tmp_path / "store")
    key, job = storage.keys.create("erin"), new_job(storage)
    storage.close()
    storage.close()  # idempotent
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["adapters", "vera.sqlite"]
    with sqlite3.connect(tmp_path / "store" / "vera.sqlite") as db:
        assert db.execute("SELECT user_id FROM vera_users").fetchall() == [("erin",)]
        assert db.execute("SELECT id FROM vera_jobs").fetchall() == [(job,)]
    db.close()
    again = open_storage(str(tmp_path / "store"))
    assert again.keys.authenticate(key) == "erin" and again.jobs.get_job(job).status == "queued"
    again.close()


def test_adapters_alone_open_the_same_directory_store(tmp_path: Path) -> None:
    storage = open_storage(tmp_path / "store")
    with AdapterStore(storage.adapters, LAYOUT, KEY, FP) as store:
        store.put("ann", filled_adapter(1.0))
    storage.close()
    with AdapterStore(tmp_path / "store", LAYOUT, KEY, FP) as alone:
        assert isinstance(alone.backend, LocalBackend) and alone.meta("ann").version == 1


def test_a_database_url_is_one_pool_for_every_component(postgres) -> None:
    dsn = postgres.new_database().replace("postgres@", "postgres:pw-hidden@")
    storage = open_storage(dsn)
    assert isinstance(storage.db, PostgresDatabase) and not storage.db.exclusive
    assert storage.adapters.db is storage.db and isinstance(storage.adapters.blobs, PgBlobs)
    assert storage.description == dsn.replace(":pw-hidden", "")
    key, job = storage.keys.create("frank"), new_job(storage)
    storage.close()
    with psycopg.connect(dsn) as conn:  # everything lives in the database itself
        assert conn.execute("SELECT user_id FROM vera_users").fetchall() == [("frank",)]
        assert conn.execute("SELECT id FROM vera_jobs").fetchall() == [(job,)]
    again = open_storage(dsn.replace("postgresql://", "postgres://"))
    assert again.keys.authenticate(key) == "frank"
    again.close()
    with AdapterStore(dsn, LAYOUT, KEY, FP) as alone:  # a URL opens the adapters alone too
        assert alone.put("frank", filled_adapter(1.0)).version == 1
    with pytest.raises(ValueError, match="str"):
        open_storage(Path(dsn))
