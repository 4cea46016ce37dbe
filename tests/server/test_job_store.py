"""The fine-tuning job store passes one suite on both databases (SQLite, PostgreSQL): files,
job lifecycle, claims by several workers and replicas at once, events, durability."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

import server.finetune.store
from adapters_store import Database, StoreError, StoreUnavailable, open_database
from server.finetune.store import JobLimit, JobStore

Opener = Callable[[], JobStore]


@pytest.fixture(params=["sqlite", "postgres"])
def open_db(request, tmp_path: Path) -> Iterator[Callable[[], Database]]:
    """open_db() -> a new handle on this test's database: a second process or replica (its
    own SQLite connection, or its own connection pool)."""
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


@pytest.fixture
def open_training(open_db) -> Opener:
    """open_training() -> a job store on a new handle of this test's database."""
    return lambda: JobStore(open_db())


@pytest.fixture
def store(open_training: Opener) -> JobStore:
    return open_training()


def new_job(store: JobStore, user: str = "alice", **limits: int):
    return store.create_job(user, "base", "file-x", None, {"n_epochs": 2}, None, **limits)


def active(store: JobStore, user_id: str | None = None) -> int:
    """Queued and running jobs of ``user_id`` (None: of everyone)."""
    jobs, _ = store.list_jobs(user_id, limit=1000)
    return sum(job.status in ("queued", "running") for job in jobs)


def test_file_round_trip_listing_and_delete(store: JobStore) -> None:
    content = bytes(range(256)) * 3  # every byte value: a BLOB, not text
    a = store.put_file("alice", "train.jsonl", "fine-tune", content)
    b = store.put_file("alice", "notes.txt", "assistants", b"x")
    c = store.put_file("bob", "train.jsonl", "fine-tune", b"")
    assert a.id.startswith("file-") and len(a.id) == 29 and len({a.id, b.id, c.id}) == 3
    assert (a.user_id, a.filename, a.purpose, a.bytes) == ("alice", "train.jsonl", "fine-tune", 768)
    assert abs(a.created_at - time.time()) < 5
    assert store.get_file(a.id) == a and store.file_content(a.id) == content
    assert store.file_content(c.id) == b""
    assert store.list_files("alice") == [b, a]  # newest first
    assert store.list_files("alice", "fine-tune") == [a]
    assert store.list_files(None, "fine-tune") == [c, a] and store.list_files("carol") == []
    assert store.delete_file(a.id) and not store.delete_file(a.id)
    assert store.get_file(a.id) is None and store.file_content(a.id) is None
    assert store.list_files(None) == [c, b]


def test_jobs_newest_first_with_pages(store: JobStore) -> None:
    jobs = [new_job(store, user) for user in ("alice", "bob", "alice", "alice", "bob")]
    job = jobs[0]
    assert job.id.startswith("ftjob-") and len(job.id) == 30
    assert (job.status, job.attempts, job.owner, job.cancel_requested) == ("queued", 0, None, False)
    assert job.hyperparameters == {"n_epochs": 2} and store.get_job(job.id) == job
    assert store.get_job("ftjob-missing") is None
    newest = jobs[::-1]
    assert store.list_jobs(None) == (newest, False)
    page, more = store.list_jobs(None, limit=2)
    assert (page, more) == (newest[:2], True)
    page, more = store.list_jobs(None, after=page[-1].id, limit=2)
    assert (page, more) == (newest[2:4], True)
    assert store.list_jobs(None, after=page[-1].id, limit=2) == ([newest[4]], False)
    alice = [jobs[3], jobs[2], jobs[0]]
    assert store.list_jobs("alice", limit=3) == (alice, False)
    assert store.list_jobs("alice", after=alice[0].id) == (alice[1:], False)
    assert store.list_jobs("alice", after="ftjob-unknown") == ([], False)


def test_created_at_orders_before_insertion(store: JobStore, monkeypatch) -> None:
    monkeypatch.setattr(server.finetune.store, "_now", lambda: 2_000)
    later = new_job(store)
    monkeypatch.setattr(server.finetune.store, "_now", lambda: 1_000)
    earlier = new_job(store)  # inserted second, created first (another replica's clock)
    assert store.list_jobs(None)[0] == [later, earlier]
    assert store.claim("w", 60).id == earlier.id


def test_limits_on_active_jobs(store: JobStore) -> None:
    first = new_job(store, "alice", max_active_per_user=1)
    with pytest.raises(JobLimit, match="alice"):
        new_job(store, "alice", max_active_per_user=1)
    new_job(store, "bob", max_active_per_user=1, max_queued=3)
    store.claim("w", 60)  # running jobs count too
    new_job(store, "carol", max_queued=3)
    with pytest.raises(JobLimit, match="full"):
        new_job(store, "dave", max_queued=3)
    assert active(store) == 3 and active(store, "alice") == 1
    assert len(store.list_jobs(None)[0]) == 3  # the refused ones left nothing
    store.finish(first.id, None, "succeeded")
    new_job(store, "alice", max_active_per_user=1, max_queued=3)
    assert active(store, "alice") == 1 and active(store, "erin") == 0


def test_concurrent_creates_never_exceed_the_limit(open_training: Opener) -> None:
    replicas = [open_training() for _ in range(4)]
    start = threading.Barrier(4)

    def create(store: JobStore) -> int:
        start.wait()
        made = 0
        for _ in range(3):
            try:
                new_job(store, "alice", max_queued=5)
                made += 1
            except JobLimit:
                pass
        return made

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(create, replicas)) == 5
    assert active(replicas[0]) == 5


def test_claim_takes_the_oldest_queued_job(store: JobStore) -> None:
    assert store.claim("w1", 60) is None
    jobs = [new_job(store) for _ in range(3)]
    claimed = store.claim("w1", 60)
    assert claimed.id == jobs[0].id and store.get_job(jobs[0].id) == claimed
    assert (claimed.status, claimed.owner, claimed.attempts) == ("running", "w1", 1)
    assert claimed.started_at is not None and abs(claimed.heartbeat_at - time.time()) < 5
    assert [store.claim("w2", 60).id for _ in range(2)] == [jobs[1].id, jobs[2].id]
    assert store.claim("w3", 60) is None  # all running with fresh heartbeats


def test_concurrent_claimers_take_every_job_exactly_once(open_training: Opener) -> None:
    first = open_training()
    jobs = {new_job(first).id for _ in range(10)}
    replicas = [first, *(open_training() for _ in range(3))]
    start = threading.Barrier(4)

    def drain(index: int) -> list[str]:
        start.wait()
        taken = []
        while (job := replicas[index].claim(f"w{index}", 60)) is not None:
            taken.append(job.id)
        return taken

    with ThreadPoolExecutor(4) as pool:
        taken = [job_id for ids in pool.map(drain, range(4)) for job_id in ids]
    assert sorted(taken) == sorted(jobs)  # each once
    assert all(first.get_job(j).attempts == 1 for j in jobs)


def test_stale_job_is_claimed_again_and_its_old_owner_loses_it(store: JobStore) -> None:
    job = new_job(store)
    first = store.claim("w1", 60)
    assert store.claim("w2", 60) is None  # the heartbeat is fresh
    time.sleep(0.05)
    again = store.claim("w2", 0.01)  # w1 has not heartbeaten for 0.01 s: presumed dead
    assert (again.id, again.owner, again.attempts) == (job.id, "w2", 2)
    assert again.started_at == first.started_at and again.heartbeat_at > first.heartbeat_at
    assert not store.heartbeat(job.id, "w1") and store.finish(job.id, "w1", "failed") is None
    assert store.heartbeat(job.id, "w2")


def test_stale_job_asked_to_cancel_is_cancelled_not_resumed(store: JobStore) -> None:
    job = new_job(store)
    store.claim("w1", 60)
    store.request_cancel(job.id)
    queued = new_job(store)
    time.sleep(0.05)
    assert store.claim("w2", 0.01).id == queued.id
    ended = store.get_job(job.id)
    assert (ended.status, ended.owner, ended.attempts) == ("cancelled", None, 1)
    assert ended.finished_at is not None


def test_heartbeat_records_progress_for_the_owner_only(store: JobStore) -> None:
    job = new_job(store)
    assert not store.heartbeat(job.id, "w1")  # queued: nobody owns it
    before = store.claim("w1", 60).heartbeat_at
    assert not store.heartbeat(job.id, "w2", trained_tokens=9)
    assert store.heartbeat(job.id, "w1", trained_tokens=100, result={"loss": [2.5, 1.5]})
    assert store.heartbeat(job.id, "w1")  # nothing given: the progress stays
    now = store.get_job(job.id)
    assert (now.trained_tokens, now.result) == (100, {"loss": [2.5, 1.5]})
    assert now.heartbeat_at > before


def test_finish_once_and_only_by_the_owner(store: JobStore) -> None:
    job = new_job(store)
    store.claim("w1", 60)
    store.heartbeat(job.id, "w1", trained_tokens=50)
    assert store.finish(job.id, "w2", "succeeded") is None
    with pytest.raises(ValueError, match="terminal"):
        store.finish(job.id, "w1", "running")
    done = store.finish(
        job.id, "w1", "succeeded", fine_tuned_model="ft:base:alice", result={"v": 3}
    )
    assert (done.status, done.owner, done.fine_tuned_model) == ("succeeded", None, "ft:base:alice")
    assert (done.trained_tokens, done.result) == (50, {"v": 3}) and done.finished_at is not None
    assert store.get_job(job.id) == done
    assert (
        store.finish(job.id, "w1", "failed") is None
        and store.finish(job.id, None, "failed") is None
    )
    queued = new_job(store)  # without an owner: the server fails a job that never started
    error = {"code": "invalid_training_file", "message": "gone", "param": "training_file"}
    failed = store.finish(queued.id, None, "failed", error=error)
    assert (failed.status, failed.error, failed.started_at) == ("failed", error, None)


def test_request_cancel(store: JobStore) -> None:
    queued, running = new_job(store), new_job(store)
    assert store.claim("w1", 60).id == queued.id and store.claim("w1", 60).id == running.id
    queued = new_job(store)
    cancelled = store.request_cancel(queued.id)
    assert (cancelled.status, cancelled.cancel_requested) == ("cancelled", False)
    assert cancelled.finished_at is not None
    asked = store.request_cancel(running.id)
    assert (asked.status, asked.cancel_requested, asked.owner) == ("running", True, "w1")
    assert store.heartbeat(running.id, "w1") and store.get_job(running.id).cancel_requested
    ended = store.finish(running.id, "w1", "cancelled")
    assert ended.status == "cancelled" and store.request_cancel(running.id) == ended
    assert store.request_cancel("ftjob-missing") is None
    assert active(store) == 1  # only the first job, still running


def test_requeue_hands_the_job_back(store: JobStore) -> None:
    job = new_job(store)
    store.claim("w1", 60)
    assert not store.requeue(job.id, "w2")
    assert store.requeue(job.id, "w1") and not store.requeue(job.id, "w1")
    back = store.get_job(job.id)
    assert (back.status, back.owner, back.heartbeat_at, back.attempts) == ("queued", None, None, 1)
    again = store.claim("w2", 60)
    assert (again.id, again.attempts, again.started_at) == (job.id, 2, back.started_at)
    store.request_cancel(job.id)
    assert store.requeue(job.id, "w2")  # asked to cancel: not queued again
    assert store.get_job(job.id).status == "cancelled" and store.claim("w3", 60) is None


def test_events_numbered_newest_first_in_pages(open_training: Opener) -> None:
    store, replica = open_training(), open_training()
    job, other = new_job(store), new_job(store)
    metrics = store.add_event(job.id, "step 1", type="metrics", data={"loss": 1.25})
    assert metrics.id.startswith("ftevent-") and (metrics.seq, metrics.data) == (1, {"loss": 1.25})
    with ThreadPoolExecutor(2) as pool:  # two writers of one job: no seq twice
        list(pool.map(lambda s: [s.add_event(job.id, "m") for _ in range(5)], (store, replica)))
    store.add_event(other.id, "other job", level="warn")
    events, more = store.list_events(job.id, limit=4)
    assert [e.seq for e in events] == [11, 10, 9, 8] and more
    events, more = replica.list_events(job.id, after=events[-1].id, limit=10)
    assert [e.seq for e in events] == [7, 6, 5, 4, 3, 2, 1] and not more
    assert events[-1] == metrics and len({e.id for e in events}) == 7
    assert [(e.seq, e.level) for e in store.list_events(other.id)[0]] == [(1, "warn")]
    with pytest.raises(StoreError, match="no fine-tuning job"):
        store.add_event("ftjob-missing", "x")
    with pytest.raises(ValueError):
        store.add_event(job.id, "x", level="debug")
    assert store.list_events(job.id, limit=20)[0][0].seq == 11  # the refused ones left nothing


def test_records_survive_closing_and_reopening(open_db) -> None:
    db = open_db()
    store = JobStore(db)
    file = store.put_file("alice", "t.jsonl", "fine-tune", b'{"messages": []}\n')
    job = store.create_job("alice", "base", file.id, "file-v", {"lr": 0.1}, "mine")
    store.claim("w1", 60)
    store.heartbeat(job.id, "w1", trained_tokens=7, result={"adapter_version": 4})
    event = store.add_event(job.id, "started", data={"epoch": 0})
    running = store.get_job(job.id)
    db.close()
    db.close()  # idempotent
    reopened = JobStore(open_db())
    assert (
        reopened.get_file(file.id) == file
        and reopened.file_content(file.id) == b'{"messages": []}\n'
    )
    assert reopened.get_job(job.id) == running and running.validation_file == "file-v"
    assert reopened.list_events(job.id) == ([event], False)
    assert reopened.add_event(job.id, "resumed").seq == 2


def raises_unavailable_quickly(call: Callable[[], object]) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        call()
    assert time.monotonic() - started < 3.5  # the pool timeout plus scheduling slack


def test_database_refusing_connections_gives_store_unavailable(postgres) -> None:
    """The outage is the database's: its connections are cut and new ones refused (cheaper
    than stopping the whole server, whose shutdown checkpoint is slow after many tests)."""
    dsn = postgres.new_database()
    name = dsn.rsplit("/", 1)[1]
    store = JobStore(db := open_database(dsn))
    job = new_job(store)
    calls = [lambda: store.get_job(job.id), lambda: store.claim("w", 60), lambda: new_job(store)]
    with psycopg.connect(postgres.dsn, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        try:
            with ThreadPoolExecutor(len(calls)) as threads:  # at once: each gives up quickly
                list(threads.map(raises_unavailable_quickly, calls))
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert store.claim("w", 60).id == job.id  # the first call after it is back succeeds
    db.close()
