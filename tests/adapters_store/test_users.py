"""API-key registries (SQLite, PostgreSQL) pass one suite; open_storage picks the backend."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from adapters_store import (
    AdapterStore,
    InvalidUserId,
    LocalBackend,
    PostgresBackend,
    PostgresUsers,
    SqliteUsers,
    UserExists,
    UserRegistry,
    open_storage,
)
from adapters_store.pg_pool import open_pool


@pytest.fixture(params=["sqlite", "postgres"])
def open_users(request, tmp_path: Path) -> Iterator[Callable[[], UserRegistry]]:
    """open_users() -> a new registry on this test's storage (all share one file or DB)."""
    closers: list[Callable[[], None]] = []
    if request.param == "postgres":
        dsn = request.getfixturevalue("postgres").new_database()

        def _open() -> UserRegistry:
            pool = open_pool(dsn)
            closers.append(pool.close)
            return PostgresUsers(pool)
    else:

        def _open() -> UserRegistry:
            users = SqliteUsers(tmp_path / "users.sqlite")
            closers.append(users.close)
            return users

    yield _open
    for close in closers:
        close()


def stored_digests(users: UserRegistry) -> list[str]:
    if isinstance(users, PostgresUsers):
        with users._pool.connection() as conn:
            return [d for (d,) in conn.execute("SELECT key_sha256 FROM vera_users").fetchall()]
    assert isinstance(users, SqliteUsers)
    return [d for (d,) in users._db.execute("SELECT key_sha256 FROM users").fetchall()]


def test_key_works_on_every_registry_of_the_same_storage(open_users) -> None:
    a, b = open_users(), open_users()
    key = a.create("alice")
    assert key.startswith("vk-") and len(key) > 40
    assert a.authenticate(key) == b.authenticate(key) == "alice"
    assert b.authenticate(key + "x") is None and b.authenticate("") is None
    assert stored_digests(b) == [hashlib.sha256(key.encode()).hexdigest()]  # never the key


def test_existing_user_needs_rotate_and_rotation_revokes_old_key(open_users) -> None:
    a, b = open_users(), open_users()
    old = a.create("bob")
    with pytest.raises(UserExists, match="rotate"):
        b.create("bob")
    assert a.authenticate(old) == "bob"  # the refused create changed nothing
    new = b.create("bob", rotate=True)
    assert new != old and a.authenticate(new) == "bob" and a.authenticate(old) is None
    assert b.create("carol", rotate=True)  # rotate also creates


def test_concurrent_creates_of_one_user_give_one_key(open_users) -> None:
    registries = [open_users() for _ in range(4)]

    def create(users: UserRegistry) -> str | None:
        try:
            return users.create("dave")
        except UserExists:
            return None

    with ThreadPoolExecutor(4) as pool:
        keys = [k for k in pool.map(create, registries) if k is not None]
    assert len(keys) == 1 and registries[0].authenticate(keys[0]) == "dave"


def test_invalid_user_id_is_refused(open_users) -> None:
    with pytest.raises(InvalidUserId):
        open_users().create("../x")


def test_open_storage_directory(tmp_path: Path) -> None:
    storage = open_storage(tmp_path / "store")
    assert isinstance(storage.backend, LocalBackend) and isinstance(storage.users, SqliteUsers)
    assert storage.description == str(tmp_path / "store")
    key = storage.users.create("erin")
    storage.close()
    storage.close()  # idempotent
    assert sqlite3.connect(tmp_path / "store" / "users.sqlite").execute(
        "SELECT user_id FROM users"
    ).fetchall() == [("erin",)]
    again = open_storage(str(tmp_path / "store"))
    assert again.users.authenticate(key) == "erin"
    again.close()


def test_open_storage_database_url_shares_one_pool(postgres) -> None:
    dsn = postgres.new_database().replace("postgres@", "postgres:pw-hidden@")
    storage = open_storage(dsn)
    assert isinstance(storage.backend, PostgresBackend)
    assert isinstance(storage.users, PostgresUsers) and storage.users._pool is storage.backend.pool
    assert storage.description == dsn.replace(":pw-hidden", "")
    key = storage.users.create("frank")
    storage.close()
    with psycopg.connect(dsn) as conn:  # the keys live in the database itself
        assert conn.execute("SELECT user_id FROM vera_users").fetchall() == [("frank",)]
    again = open_storage(dsn.replace("postgresql://", "postgres://"))
    assert again.users.authenticate(key) == "frank"
    again.close()
    with pytest.raises(ValueError, match="open_storage"):
        AdapterStore(dsn, None, 0, "")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="str"):
        open_storage(Path(dsn))
