"""The store's database handle: one SQL text on both dialects, transactions, migrations, the
writer lock, JSON, the change feed, and the import of a legacy directory file."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_postgres import wait_for

from adapters_store import (
    Database,
    LegacyFile,
    StoreError,
    StoreUnavailable,
    is_database_url,
    open_database,
)

TABLE = "CREATE TABLE t (k text PRIMARY KEY, n bigint NOT NULL, doc text);"
STEPS = {"sqlite": (TABLE,), "postgresql": (TABLE,)}
WITH_EXTRA = {dialect: (TABLE, "ALTER TABLE t ADD COLUMN extra bigint;") for dialect in STEPS}


@pytest.fixture(params=["sqlite", "postgres"])
def open_db(request, tmp_path: Path) -> Iterator[Callable[[], Database]]:
    """open_db() -> a new handle on this test's database (another process or replica)."""
    location = str(tmp_path / "store")
    if request.param == "postgres":
        location = request.getfixturevalue("postgres").new_database()
    opened: list[Database] = []

    def _open() -> Database:
        opened.append(open_database(location))
        return opened[-1]

    yield _open
    for db in opened:
        db.close()


def applied(db: Database, component: str) -> list[int]:
    query = "SELECT version FROM vera_migrations WHERE component = %s ORDER BY 1"
    return [v for (v,) in db.run(lambda sql: sql.execute(query, (component,)).fetchall())]


def test_one_sql_text_runs_on_both_dialects(open_db) -> None:
    db = open_db()
    assert db.migrate("test", STEPS) == 1
    insert = "INSERT INTO t (k, n) VALUES (%s, %s) RETURNING n"
    assert db.run(lambda sql: sql.execute(insert, ("a", 1)).fetchone(), write=True) == (1,)
    db.run(lambda sql: sql.execute(insert, ("b", 2)), write=True, durable=False)
    bump = "UPDATE t SET n = n + 10 WHERE n < %s"
    assert db.run(lambda sql: sql.execute(bump, (5,)).rowcount, write=True) == 2
    rows = db.run(lambda sql: sql.execute("SELECT k, n FROM t ORDER BY k").fetchall())
    assert [tuple(r) for r in rows] == [("a", 11), ("b", 12)]
    assert open_db().run(lambda sql: sql.execute("SELECT count(*) FROM t").fetchone()[0]) == 2


def test_a_write_that_raises_leaves_nothing(open_db) -> None:
    db = open_db()
    db.migrate("test", STEPS)

    def half(sql) -> None:
        sql.execute("INSERT INTO t (k, n) VALUES (%s, %s)", ("a", 1))
        raise RuntimeError("stop before commit")

    with pytest.raises(RuntimeError):
        db.run(half, write=True)
    assert db.run(lambda sql: sql.execute("SELECT count(*) FROM t").fetchone()[0]) == 0


def test_migrations_apply_each_missing_step_once_and_refuse_a_newer_database(open_db) -> None:
    first, second = open_db(), open_db()
    assert first.migrate("test", STEPS) == 1 and second.migrate("test", STEPS) == 1
    assert applied(first, "test") == [1]
    assert second.migrate("test", WITH_EXTRA) == 2 and first.migrate("test", WITH_EXTRA) == 2
    assert applied(first, "test") == [1, 2]
    first.run(lambda sql: sql.execute("INSERT INTO t (k, n, extra) VALUES ('a', 1, 2)"), write=True)
    with pytest.raises(StoreError, match="newer than this server"):
        open_db().migrate("test", STEPS)  # an older release on the upgraded database
    with pytest.raises(StoreError, match="no"):
        first.migrate("other", {"elsewhere": (TABLE,)})


def test_replicas_migrating_at_once_apply_each_step_once(open_db) -> None:
    handles = [open_db() for _ in range(4)]
    barrier = threading.Barrier(len(handles))

    def migrate(db: Database) -> int:
        barrier.wait()
        return db.migrate("test", WITH_EXTRA)

    with ThreadPoolExecutor(len(handles)) as pool:
        assert list(pool.map(migrate, handles)) == [2] * len(handles)
    assert applied(handles[0], "test") == [1, 2]


def test_the_writer_lock_serializes_read_modify_write(open_db) -> None:
    """Each write reads n, then stores n + 1, under the lock of one resource: none is lost."""
    handles = [open_db() for _ in range(4)]
    handles[0].migrate("test", STEPS)
    handles[0].run(lambda sql: sql.execute("INSERT INTO t (k, n) VALUES ('c', 0)"), write=True)

    def bump(db: Database) -> None:
        for _ in range(10):

            def write(sql) -> None:
                db.lock(sql, "counter/c")
                n = sql.execute("SELECT n FROM t WHERE k = 'c'").fetchone()[0]
                time.sleep(0.001)  # widen the window a lost update would need
                sql.execute("UPDATE t SET n = %s WHERE k = 'c'", (n + 1,))

            db.run(write, write=True)

    with ThreadPoolExecutor(len(handles)) as pool:
        list(pool.map(bump, handles))
    n = handles[0].run(lambda sql: sql.execute("SELECT n FROM t WHERE k = 'c'").fetchone()[0])
    assert n == 10 * len(handles)


def test_json_columns_round_trip(open_db) -> None:
    db = open_db()
    json_type = "jsonb" if db.dialect == "postgresql" else "text"
    step = f"CREATE TABLE j (k text PRIMARY KEY, doc {json_type});"
    db.migrate("json", {db.dialect: (step,)})
    doc = {"loss": [2.5, 1.25], "name": "ü", "nested": {"ok": True}}
    insert = "INSERT INTO j VALUES (%s, %s)"
    db.run(lambda sql: sql.execute(insert, ("a", db.json_param(doc))), write=True)
    db.run(lambda sql: sql.execute(insert, ("b", db.json_param(None))), write=True)
    rows = db.run(lambda sql: sql.execute("SELECT doc FROM j ORDER BY k").fetchall())
    assert [db.json_value(row[0]) for row in rows] == [doc, None]


def test_notifications_are_heard_at_commit_only(open_db) -> None:
    writer, listener = open_db(), open_db()
    heard: list[str | None] = []
    listener.subscribe("vera_test", heard.append)

    def failing(sql) -> None:
        writer.notify(sql, "vera_test", "rolled-back")
        raise RuntimeError("no commit")

    with pytest.raises(RuntimeError):
        writer.run(failing, write=True)
    writer.run(lambda sql: writer.notify(sql, "vera_test", "committed"), write=True)
    if writer.exclusive:  # a directory store: nobody else writes, nothing to hear
        assert heard == []
    else:
        assert wait_for(lambda: heard == ["committed"], 2.0), heard
        time.sleep(0.2)
        assert heard == ["committed"]


def test_descriptions_and_exclusivity(open_db, tmp_path: Path) -> None:
    db = open_db()
    if db.dialect == "sqlite":
        assert db.exclusive and db.description == str(tmp_path / "store")
        assert (tmp_path / "store" / "vera.sqlite").is_file()
    else:
        assert not db.exclusive and db.description.startswith("postgresql://postgres@")
    assert is_database_url("postgresql://x") and is_database_url("postgres://x")
    assert not is_database_url(tmp_path)
    with pytest.raises(ValueError, match="str"):
        open_database(Path("postgresql://postgres@127.0.0.1/x"))


def test_description_hides_the_password(postgres) -> None:
    dsn = postgres.new_database().replace("postgres@", "postgres:pw-hidden@")
    db = open_database(dsn)
    assert db.description == dsn.replace(":pw-hidden", "")
    db.close()
    db.close()  # idempotent


def test_a_legacy_file_is_imported_once_then_kept_aside(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    old = sqlite3.connect(store / "old.sqlite")
    old.execute("CREATE TABLE things (k TEXT PRIMARY KEY, n INTEGER NOT NULL)")
    old.executemany("INSERT INTO things VALUES (?, ?)", [("a", 1), ("b", 2)])
    old.commit()
    old.close()
    legacy = LegacyFile("old.sqlite", {"things": "t", "absent": "t"})
    db = open_database(store)
    db.migrate("test", WITH_EXTRA, legacy)
    rows = db.run(lambda sql: sql.execute("SELECT k, n, extra FROM t ORDER BY k").fetchall())
    assert rows == [("a", 1, None), ("b", 2, None)]
    assert not (store / "old.sqlite").exists() and (store / "old.sqlite.migrated").is_file()
    # a crash between the import's commit and the rename: the next open only renames
    (store / "old.sqlite.migrated").rename(store / "old.sqlite")
    db.migrate("test", WITH_EXTRA, legacy)
    assert db.run(lambda sql: sql.execute("SELECT count(*) FROM t").fetchone()[0]) == 2
    assert not (store / "old.sqlite").exists()
    db.close()


def test_a_failed_sqlite_commit_is_an_unknown_outcome(tmp_path: Path) -> None:
    """A COMMIT that fails (a disk error) may still have reached the disk: StoreUnavailable,
    which callers treat as "maybe", never as "nothing happened"."""
    db = open_database(tmp_path)
    db.migrate("test", STEPS)
    real = db._conn  # type: ignore[attr-defined]

    class FailingCommit:
        in_transaction = property(lambda self: real.in_transaction)

        def execute(self, query: str, *args):
            if query == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            return real.execute(query, *args)

    db._conn = FailingCommit()  # type: ignore[attr-defined]
    insert = "INSERT INTO t (k, n) VALUES ('a', 1)"
    with pytest.raises(StoreUnavailable, match="may or may not"):
        db.run(lambda sql: sql.execute(insert), write=True)
    db._conn = real  # type: ignore[attr-defined]
    assert db.run(lambda sql: sql.execute("SELECT count(*) FROM t").fetchone()[0]) == 0
    db.close()
