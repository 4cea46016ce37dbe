"""Upgrades lose nothing: a store the previous release wrote (a directory of three SQLite files
plus adapter files, or a PostgreSQL database at ``vera_schema`` version 2) opens with every
adapter version, API key, file, job and event intact."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from legacy_layouts import LEGACY_INDEX, LEGACY_PG, LEGACY_TRAINING, LEGACY_USERS

sys.path.insert(0, str(Path(__file__).parents[1] / "adapters_store"))

from helpers import FP, KEY, LAYOUT, filled_adapter, stamped_bytes  # noqa: E402

from adapters_store import AdapterStore, StoreError  # noqa: E402
from server.auth import key_digest  # noqa: E402
from server.finetune.records import JobEvent, JobRecord  # noqa: E402
from server.storage import Storage, open_storage  # noqa: E402

KEYS = {"alice": "vk-alice-legacy-key", "bob": "vk-bob-legacy-key"}
# (user, version, value, retired seconds ago): ann has a retained v1 and a current v2; bob's
# v3 is current and his counter is at 4 (a publish that never completed); cy removed his adapter
VERSIONS = [("ann", 1, 1.0, 10.0), ("ann", 2, 2.0, None), ("bob", 3, 3.0, None)]
VERSIONS += [("cy", 1, 4.0, 5.0)]
COUNTERS = {"ann": 2, "bob": 4, "cy": 1}
FILE = ("file-legacy", "alice", "train.jsonl", "fine-tune", 17, 1_700_000_000)
CONTENT = b'{"messages": []}\n'
JOB = JobRecord(
    id="ftjob-legacy",
    user_id="alice",
    model="base",
    training_file="file-legacy",
    validation_file=None,
    hyperparameters={"n_epochs": 2},
    suffix=None,
    status="running",
    created_at=1_700_000_001,
    started_at=1_700_000_002,
    finished_at=None,
    error=None,
    fine_tuned_model=None,
    trained_tokens=120,
    result={"adapter_version": 4, "losses": [2.5, 1.5]},
    attempts=1,
    owner="host:1:abcd",
    heartbeat_at=1_700_000_003.5,
    cancel_requested=False,
)
EVENTS = [
    JobEvent("ftevent-1", JOB.id, 1, 1_700_000_001, "info", "created", "message", None),
    JobEvent("ftevent-2", JOB.id, 2, 1_700_000_002, "info", "step", "metrics", {"loss": 2.5}),
]


def blob(value: float) -> bytes:
    return stamped_bytes(filled_adapter(value))


def version_rows() -> list[tuple]:
    """Rows of the legacy index: (user_id, version, bytes, num_params, sha256, created_at,
    base_fingerprint, retired_at)."""
    rows, now = [], time.time()  # when the store is written: retired versions are retained
    for user, version, value, retired_ago in VERSIONS:
        data = blob(value)
        sha = hashlib.sha256(data).hexdigest()
        retired_at = None if retired_ago is None else now - retired_ago
        rows.append((user, version, len(data), LAYOUT.num_params, sha, now - 60, FP, retired_at))
    return rows


def job_row(jsonify) -> tuple:
    return tuple(
        jsonify(v) if k in ("hyperparameters", "error", "result") else v
        for k, v in JOB.__dict__.items()
    )


def write_legacy_directory(root: Path, scratch: Path) -> None:
    """The previous release's directory store. users.sqlite is taken as a crashed server
    left it: its last write still in the WAL, never checkpointed into the main file."""
    for user, version, value, _ in VERSIONS:
        (root / "adapters" / user).mkdir(parents=True, exist_ok=True)
        (root / "adapters" / user / f"v{version}.safetensors").write_bytes(blob(value))
    with sqlite3.connect(root / "index.sqlite") as index:
        index.executescript(LEGACY_INDEX)
        index.executemany("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)", version_rows())
        index.executemany("INSERT INTO counters VALUES (?, ?)", COUNTERS.items())
    index.close()
    with sqlite3.connect(root / "training.sqlite") as training:
        training.executescript(LEGACY_TRAINING)
        training.execute(
            "INSERT INTO vera_files (id, user_id, filename, purpose, bytes, created_at, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (*FILE, CONTENT),
        )
        columns = ", ".join(JOB.__dict__)
        marks = ", ".join("?" * len(JOB.__dict__))
        training.execute(
            f"INSERT INTO vera_jobs ({columns}, event_seq) VALUES ({marks}, 2)",
            job_row(json.dumps),
        )
        for e in EVENTS:
            row = (*e.__dict__.values(),)[:-1] + (None if e.data is None else json.dumps(e.data),)
            training.execute("INSERT INTO vera_job_events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
    training.close()
    crashed = sqlite3.connect(scratch / "users.sqlite", isolation_level=None)
    crashed.execute("PRAGMA journal_mode=WAL")
    crashed.execute("PRAGMA wal_autocheckpoint=0")
    crashed.executescript(LEGACY_USERS)
    for user, key in KEYS.items():
        crashed.execute("INSERT INTO users VALUES (?, ?, ?)", (user, key_digest(key), time.time()))
    for name in ("users.sqlite", "users.sqlite-wal"):  # copied while the writer still runs
        shutil.copy(scratch / name, root / name)
    crashed.close()


def check_everything_is_there(storage: Storage) -> None:
    """Every adapter version, key, file, job and event written by the previous release."""
    with AdapterStore(storage.adapters, LAYOUT, KEY, FP) as store:
        assert store.recovery.clean, store.recovery
        assert [(m.user_id, m.version) for m in store.list()] == [("ann", 2), ("bob", 3)]
        for user, version, value, _ in VERSIONS:
            assert store.load_flat(user, version)[0].item() == value, (user, version)
        assert store.meta("ann").sha256 == version_rows()[1][4]
    # a blob of these versions is never adopted again, even once its row was collected
    assert storage.adapters.index.last_committed() == {"ann": 2, "bob": 3, "cy": 1}
    for user, key in KEYS.items():
        assert storage.keys.authenticate(key) == user
    jobs = storage.jobs
    assert jobs.get_file(FILE[0]) is not None and jobs.file_content(FILE[0]) == CONTENT
    assert jobs.get_job(JOB.id) == JOB and jobs.list_jobs("alice") == ([JOB], False)
    assert jobs.list_events(JOB.id) == (EVENTS[::-1], False)


def check_new_writes_continue_the_old_numbering(storage: Storage) -> None:
    with AdapterStore(storage.adapters, LAYOUT, KEY, FP) as store:
        assert store.put("bob", filled_adapter(5.0)).version == 5  # v4 was handed out
        assert store.put("cy", filled_adapter(6.0)).version == 2
    assert storage.jobs.add_event(JOB.id, "resumed").seq == 3
    assert storage.jobs.claim("w", 0.0).id == JOB.id  # its legacy heartbeat is stale
    storage.keys.create("alice", rotate=True)
    assert storage.keys.authenticate(KEYS["alice"]) is None


def test_a_directory_store_of_the_previous_release(tmp_path: Path) -> None:
    root, scratch = tmp_path / "store", tmp_path / "scratch"
    root.mkdir(), scratch.mkdir()
    write_legacy_directory(root, scratch)
    storage = open_storage(root)
    check_everything_is_there(storage)
    storage.close()
    for name in ("index.sqlite", "users.sqlite", "training.sqlite"):
        assert not (root / name).exists() and (root / f"{name}.migrated").is_file(), name
    assert not (root / "users.sqlite-wal").exists()
    again = open_storage(root)  # imported once: nothing twice
    check_everything_is_there(again)
    check_new_writes_continue_the_old_numbering(again)
    again.close()


def write_legacy_database(dsn: str, schema: int = 2) -> None:
    """The previous release's PostgreSQL store, migrated to ``vera_schema`` ``schema``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE vera_schema (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version in range(1, schema + 1):
            conn.execute(LEGACY_PG[version - 1])
            conn.execute("INSERT INTO vera_schema (version) VALUES (%s)", (version,))
        for row, (user, version, value, _) in zip(version_rows(), VERSIONS):
            conn.execute("INSERT INTO vera_versions VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", row)
            conn.execute("INSERT INTO vera_blobs VALUES (%s, %s, %s)", (user, version, blob(value)))
        for user, last in COUNTERS.items():
            conn.execute("INSERT INTO vera_counters VALUES (%s, %s)", (user, last))
        for user, key in KEYS.items():
            conn.execute(
                "INSERT INTO vera_users VALUES (%s, %s, %s)", (user, key_digest(key), time.time())
            )
        if schema < 2:
            return
        conn.execute(
            "INSERT INTO vera_files (id, user_id, filename, purpose, bytes, created_at, data) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (*FILE, CONTENT),
        )
        columns = ", ".join(JOB.__dict__)
        marks = ", ".join(["%s"] * len(JOB.__dict__))
        conn.execute(
            f"INSERT INTO vera_jobs ({columns}, event_seq) VALUES ({marks}, 2)",
            job_row(psycopg.types.json.Jsonb),
        )
        for e in EVENTS:
            data = None if e.data is None else psycopg.types.json.Jsonb(e.data)
            row = (*e.__dict__.values(),)[:-1] + (data,)
            conn.execute("INSERT INTO vera_job_events VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", row)


def open_at_once(location: str, count: int) -> list[Storage]:
    barrier = threading.Barrier(count)

    def start(_: int) -> Storage:
        barrier.wait()
        return open_storage(location)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(start, range(count)))


def test_a_postgresql_store_of_the_previous_release(postgres) -> None:
    dsn = postgres.new_database()
    write_legacy_database(dsn)
    replicas = open_at_once(dsn, 3)  # new replicas booting together on the old database
    with psycopg.connect(dsn) as conn:
        applied = conn.execute(
            "SELECT component, version FROM vera_migrations ORDER BY 1, 2"
        ).fetchall()
        stamped = conn.execute("SELECT count(stored_at) FROM vera_blobs").fetchone()[0]
    assert applied == [
        ("adapters", 1), ("adapters", 2), ("blobs", 1), ("blobs", 2), ("jobs", 1), ("keys", 1),
    ]  # fmt: skip
    assert stamped == len(VERSIONS)
    check_everything_is_there(replicas[0])
    check_new_writes_continue_the_old_numbering(replicas[1])
    for storage in replicas:
        storage.close()


def test_a_postgresql_store_from_before_fine_tuning_gains_its_tables(postgres) -> None:
    dsn = postgres.new_database()
    write_legacy_database(dsn, schema=1)
    storage = open_storage(dsn)
    assert storage.keys.authenticate(KEYS["bob"]) == "bob"
    job = storage.jobs.create_job("bob", "base", "file-x", None, {}, None)
    assert storage.jobs.get_job(job.id) == job
    with AdapterStore(storage.adapters, LAYOUT, KEY, FP) as store:
        assert store.meta("bob").version == 3 and store.recovery.clean
    storage.close()


@pytest.mark.parametrize("component", ["adapters", "jobs"])
def test_a_store_migrated_by_a_newer_release_is_refused(tmp_path: Path, component: str) -> None:
    open_storage(tmp_path / "store").close()
    with sqlite3.connect(tmp_path / "store" / "vera.sqlite") as conn:
        conn.execute("INSERT INTO vera_migrations VALUES (?, 99, 0)", (component,))
    conn.close()
    with pytest.raises(StoreError, match="newer than this server"):
        open_storage(tmp_path / "store")
