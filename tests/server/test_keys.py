"""The API-key registry passes one suite on both databases (SQLite, PostgreSQL)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adapters_store import Database, open_database
from server.auth import KeyRegistry, UserExists


@pytest.fixture(params=["sqlite", "postgres"])
def open_users(request, tmp_path: Path) -> Iterator[Callable[[], KeyRegistry]]:
    """open_users() -> a registry on a new handle of this test's database (a second process
    or replica: its own SQLite connection, or its own connection pool)."""
    location = str(tmp_path / "store")
    if request.param == "postgres":
        location = request.getfixturevalue("postgres").new_database()
    opened: list[Database] = []

    def _open() -> KeyRegistry:
        opened.append(open_database(location))
        return KeyRegistry(opened[-1])

    yield _open
    for db in opened:
        db.close()


def stored_digests(users: KeyRegistry) -> list[str]:
    query = "SELECT key_sha256 FROM vera_users"
    return [d for (d,) in users._db.run(lambda sql: sql.execute(query).fetchall())]


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

    def create(users: KeyRegistry) -> str | None:
        try:
            return users.create("dave")
        except UserExists:
            return None

    with ThreadPoolExecutor(4) as pool:
        keys = [k for k in pool.map(create, registries) if k is not None]
    assert len(keys) == 1 and registries[0].authenticate(keys[0]) == "dave"
