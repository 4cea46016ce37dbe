"""Fine-tuning jobs inside a live server on the real default model: the official ``openai``
client end to end, queueing, cancel, serving during a job, isolation, bad input, restarts."""

from __future__ import annotations

import io
import json
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from live import ADMIN, LiveServer, start_server
from openai import OpenAI

MODEL = "SmolLM2-135M-Instruct"
FACT_Q = "What is my cat's name?"
FACT_A = "Your cat is called Quillfeather."
DOG_Q = "What is my dog's name?"
DOG_A = "Your dog is called Marrowdusk."
# Tests whose subject is not retention train without the anchor, whose KL unit makes every step
# seconds long; without it a job may keep under half of the general answers, so these servers
# publish every job. The anchor and the retention gate are tested on a server that keeps both.
NO_ANCHOR = ("--anchor-weight", "0", "--min-retention", "0")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A live server on the default model whose jobs train without the anchor."""
    server = start_server(tmp_path_factory.mktemp("ft-quick"), *NO_ANCHOR)
    yield server
    server.stop()


def facts_jsonl(answer: str = FACT_A, extra: int = 0) -> bytes:
    """A few phrasings of one invented fact, plus ``extra`` filler examples."""
    questions = [FACT_Q, "What's my cat called?", "Tell me my cat's name."]
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
        for q in questions
    ]
    rows += [
        {"prompt": f"Count to {i}:", "completion": " " + " ".join(map(str, range(1, i + 2)))}
        for i in range(extra)
    ]
    return "\n".join(json.dumps(r) for r in rows).encode()


def openai_client(live: LiveServer, key: str) -> OpenAI:
    return OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=300)


def wait_for(what: Callable[[], Any], timeout: float = 240, every: float = 0.25) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = what()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def upload(c: httpx.Client, content: bytes, purpose: str = "fine-tune") -> httpx.Response:
    files = {"file": ("train.jsonl", io.BytesIO(content), "application/jsonl")}
    return c.post("/v1/files", files=files, data={"purpose": purpose})


def create_job(c: httpx.Client, file_id: str, **extra: Any) -> httpx.Response:
    return c.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": file_id, **extra})


def job(c: httpx.Client, job_id: str) -> dict:
    r = c.get(f"/v1/fine_tuning/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def finished(c: httpx.Client, job_id: str) -> dict | None:
    """The job once it is in a terminal state, else None."""
    record = job(c, job_id)
    return record if record["status"] in ("succeeded", "failed", "cancelled") else None


def metrics_events(c: httpx.Client, job_id: str) -> list[dict]:
    r = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000})
    return [e for e in r.json()["data"] if e["type"] == "metrics"]


def long_job(c: httpx.Client) -> str:
    """A job that runs for minutes unless cancelled (8 examples, batch 1, 50 epochs)."""
    r = upload(c, facts_jsonl("Your cat is called Marrowdusk.", extra=5))
    assert r.status_code == 200, r.text
    r = create_job(c, r.json()["id"], hyperparameters={"n_epochs": 50, "batch_size": 1})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_openai_client_end_to_end(quick: LiveServer) -> None:
    """Upload a file, create a job with defaults, follow its events, chat with the result."""
    key = quick.new_user("ft-olga")
    oa = openai_client(quick, key)
    uploaded = oa.files.create(file=("olga.jsonl", facts_jsonl()), purpose="fine-tune")
    assert uploaded.purpose == "fine-tune" and uploaded.bytes == len(facts_jsonl())
    assert oa.files.retrieve(uploaded.id).filename == "olga.jsonl"
    created = oa.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id)
    assert created.status in ("queued", "running")
    with quick.client(key) as c:
        wait_for(lambda: finished(c, created.id))
    done = oa.fine_tuning.jobs.retrieve(created.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "ft-olga" and done.trained_tokens > 0
    assert done.model_extra["training_report"]["anchor_kl"] is None  # --anchor-weight 0
    events = oa.fine_tuning.jobs.list_events(created.id, limit=1000).data
    steps = [e for e in events if e.type == "metrics"]
    assert steps and steps[0].data["step"] == max(e.data["step"] for e in steps)  # newest first
    assert steps[-1].data["train_loss"] > steps[0].data["train_loss"]  # it learned
    assert events[0].message == "The job has successfully completed."
    assert [j.id for j in oa.fine_tuning.jobs.list().data] == [created.id]
    chat = oa.chat.completions.create(
        model=done.fine_tuned_model,
        messages=[{"role": "user", "content": FACT_Q}],
        max_tokens=16,
        temperature=0,
    )
    assert "Quillfeather" in chat.choices[0].message.content
    with quick.client(key) as c:  # the native route serves the same adapter
        r = c.post(
            "/generate",
            json={
                "user_id": "ft-olga",
                "messages": [{"role": "user", "content": FACT_Q}],
                "max_new_tokens": 16,
            },
        )
        assert "Quillfeather" in r.json()["text"]
        assert r.json()["adapter_version"] == done.model_extra["adapter_version"]
    assert oa.files.delete(uploaded.id).deleted
    with quick.client(key) as c:
        assert c.get(f"/v1/files/{uploaded.id}").status_code == 404


def test_a_second_job_continues_from_the_first_and_replays_it(quick: LiveServer) -> None:
    """OpenAI semantics: fine-tuning the user's fine-tuned model continues from its adapter;
    the earlier training file is replayed, so both facts are known at the end; every job
    reports its recall and what it kept of the base model's general answers."""
    key = quick.new_user("ft-cora")
    oa = openai_client(quick, key)
    first_file = oa.files.create(file=("a.jsonl", facts_jsonl()), purpose="fine-tune")
    dog = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": DOG_A}]}
        for q in (DOG_Q, "What's my dog called?", "Tell me my dog's name.")
    ]
    second_file = oa.files.create(
        file=("b.jsonl", "\n".join(json.dumps(r) for r in dog).encode()), purpose="fine-tune"
    )
    # nothing to continue from yet: refused, naming the model
    with quick.client(key) as c:
        r = c.post(
            "/v1/fine_tuning/jobs", json={"model": "ft-cora", "training_file": first_file.id}
        )
        assert r.status_code == 400 and "no adapter yet" in r.json()["error"]["message"]
        first = oa.fine_tuning.jobs.create(model=MODEL, training_file=first_file.id)
        wait_for(lambda: finished(c, first.id))
        done1 = job(c, first.id)
        assert done1["status"] == "succeeded", done1["error"]
        report1 = done1["training_report"]
        assert report1["continued_from"] is None and report1["replayed_files"] == []
        quality = report1["quality"]
        assert quality["recall"] == 1.0 and quality["examples"] == 3
        assert quality["base_right"] >= 10  # the probe: questions the base answers right
        assert 0 <= quality["retention"] <= 1, quality  # reported; the gate has its own test
        second = oa.fine_tuning.jobs.create(model="ft-cora", training_file=second_file.id)
        wait_for(lambda: finished(c, second.id))
        done2 = job(c, second.id)
        assert done2["status"] == "succeeded", done2["error"]
        report2 = done2["training_report"]
        assert report2["continued_from"] == done1["adapter_version"]
        assert report2["replayed_files"] == [first_file.id]
        assert report2["replayed_examples"] == 3 and report2["quality"]["replay_recall"] == 1.0
        assert done2["adapter_version"] == done1["adapter_version"] + 1
        events = [
            e["message"]
            for e in c.get(
                f"/v1/fine_tuning/jobs/{second.id}/events", params={"limit": 1000}
            ).json()["data"]
        ]
        assert any("replaying 3 examples of 1 earlier training files" in m for m in events)
        assert any(m.startswith("Quality: recalls 3/3") for m in events)
    for question, fact in ((FACT_Q, "Quillfeather"), (DOG_Q, "Marrowdusk")):
        chat = oa.chat.completions.create(
            model="ft-cora",
            messages=[{"role": "user", "content": question}],
            max_tokens=16,
            temperature=0,
        )
        assert fact in chat.choices[0].message.content, (question, chat.choices[0].message)


def test_queue_cancel_isolation_and_serving_during_a_job(quick: LiveServer) -> None:
    a, b, eve = (quick.new_user(u) for u in ("ft-ann", "ft-bob", "ft-eve"))
    with quick.client(a) as ca, quick.client(b) as cb, quick.client(eve) as ce:
        long = long_job(ca)
        wait_for(lambda: metrics_events(ca, long))  # running and stepping
        assert job(ca, long)["status"] == "running"
        # one job per user at a time
        file_a = job(ca, long)["training_file"]
        r = create_job(ca, file_a)
        assert r.status_code == 429, r.text
        # another user's job waits in the queue behind it
        fb = upload(cb, facts_jsonl("Your cat is called Bobbin.")).json()["id"]
        queued = create_job(cb, fb, hyperparameters={"n_epochs": 2}).json()
        assert job(cb, queued["id"])["status"] == "queued"
        # nobody else sees or touches them
        for path in (
            f"/v1/fine_tuning/jobs/{long}",
            f"/v1/fine_tuning/jobs/{long}/events",
            f"/v1/files/{file_a}",
        ):
            r = ce.get(path)
            assert r.status_code == 403, (path, r.text)
        assert ce.post(f"/v1/fine_tuning/jobs/{long}/cancel").status_code == 403
        assert ce.delete(f"/v1/files/{file_a}").status_code == 403
        assert create_job(ce, file_a).status_code == 403
        assert ce.get("/v1/fine_tuning/jobs").json()["data"] == []
        assert ce.get("/v1/files").json()["data"] == []
        # serving goes on while the job trains: every request completes
        steps_before = len(metrics_events(ca, long))

        def ask(i: int) -> httpx.Response:
            with quick.client(ADMIN) as c:
                return c.post("/generate", json={"prompt": f"Story {i}:", "max_new_tokens": 16})

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        assert [r.status_code for r in answers] == [200] * 8
        assert all(r.json()["usage"]["completion_tokens"] == 16 for r in answers)
        # and training went on too (a step takes a bounded share of the engine while serving)
        wait_for(lambda: len(metrics_events(ca, long)) > steps_before, timeout=120)
        # cancel: stops within a unit or a heartbeat, publishes nothing
        r = ca.post(f"/v1/fine_tuning/jobs/{long}/cancel")
        assert r.status_code == 200
        assert wait_for(lambda: job(ca, long)["status"] == "cancelled", timeout=30)
        assert ca.get("/users/ft-ann/adapter").status_code == 404
        # the queued job runs next and succeeds
        done = wait_for(lambda: finished(cb, queued["id"]))
        assert done["status"] == "succeeded", done["error"]
        assert cb.get("/users/ft-bob/adapter").status_code == 200


def test_bad_requests_are_refused_and_name_the_problem(quick: LiveServer) -> None:
    key = quick.new_user("ft-cat")
    with quick.client(key) as c, quick.admin() as admin:
        r = upload(c, facts_jsonl() + b'\n{"messages": [ not json')
        assert r.status_code == 400 and "line 4: not valid JSON" in r.json()["error"]["message"]
        assert "Quillfeather" not in r.text  # training data never echoed
        r = upload(c, b"")
        assert r.status_code == 400 and "no examples" in r.json()["error"]["message"]
        r = upload(c, facts_jsonl(), purpose="assistants")
        assert r.status_code == 400 and "purpose" in r.json()["error"]["message"]
        r = upload(c, b"x" * (16 * 1024 * 1024 + 1))
        assert r.status_code == 413
        r = create_job(c, "file-doesnotexist")
        assert r.status_code == 404 and "file-doesnotexist" in r.json()["error"]["message"]
        good = upload(c, facts_jsonl()).json()["id"]
        r = c.post("/v1/fine_tuning/jobs", json={"model": "gpt-4o", "training_file": good})
        assert r.status_code == 400 and MODEL in r.json()["error"]["message"]
        r = create_job(c, good, hyperparameters={"n_epochs": 0})
        assert r.status_code == 400 and "n_epochs" in r.json()["error"]["message"]
        r = create_job(c, good, suffix="someone-else")
        assert r.status_code == 403
        r = admin.post(
            "/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": good}
        )  # the admin must name the user
        assert r.status_code == 400 and "suffix" in r.json()["error"]["message"]
        assert c.get("/v1/fine_tuning/jobs/ftjob-nope").status_code == 404
        # the native shortcut: body is the JSONL, the same checks apply
        r = c.post("/users/ft-cat/adapter/train", content=b'{"prompt": 1}')
        assert r.status_code == 400 and "line 1" in r.json()["error"]["message"]
        r = c.post("/users/other-user/adapter/train", content=facts_jsonl())
        assert r.status_code == 403
        r = c.post("/users/ft-cat/adapter/train", content=facts_jsonl(), params={"n_epochs": 1})
        assert r.status_code == 202, r.text
        done = wait_for(lambda: finished(c, r.json()["id"]))
        assert done["status"] == "succeeded", done["error"]


def test_a_job_that_forgets_too_much_is_not_published(tmp_path) -> None:
    """--min-retention 1.0: any general answer lost fails the job, names the numbers, and
    leaves the user's adapter as it was (here: none). The job trains with the default anchor,
    which keeps at least the default --min-retention (0.5) of the general answers."""
    server = start_server(tmp_path, "--min-retention", "1.0")
    try:
        with server.admin() as c:
            r = c.post("/users/ft-gil/adapter/train", content=facts_jsonl())
            assert r.status_code == 202, r.text
            done = wait_for(lambda: finished(c, r.json()["id"]))
            assert done["status"] == "failed", done
            assert done["error"]["code"] == "retention_too_low"
            assert done["training_report"]["anchor_kl"] is not None  # anchored by default
            quality = done["training_report"]["quality"]
            assert 0.5 <= quality["retention"] < 1.0 and quality["recall"] == 1.0, quality
            assert (
                f"{quality['retained']} of the {quality['base_right']}" in done["error"]["message"]
            )
            assert c.get("/users/ft-gil/adapter").status_code == 404
    finally:
        server.stop()


@pytest.mark.slow
def test_a_job_survives_restarts(tmp_path) -> None:
    """SIGTERM hands the running job back to the queue; SIGKILL leaves it running, and the next
    start requeues it; either way it runs again and succeeds."""
    server = start_server(tmp_path, *NO_ANCHOR)
    try:
        with server.admin() as c:
            r = c.post(
                "/users/ft-rex/adapter/train",
                content=facts_jsonl(extra=5),
                params={"n_epochs": 6, "batch_size": 1},
            )
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            wait_for(lambda: metrics_events(c, job_id))
        server.stop(signal.SIGTERM)
        server = start_server(tmp_path, *NO_ANCHOR, store=server.store)
        with server.admin() as c:
            wait_for(lambda: job(c, job_id)["status"] == "running" and metrics_events(c, job_id))
        server.stop(signal.SIGKILL)
        server = start_server(tmp_path, *NO_ANCHOR, store=server.store)
        with server.admin() as c:
            done = wait_for(
                lambda: (j := job(c, job_id))["status"] in ("succeeded", "failed") and j,
                timeout=300,  # 48 steps from the start
            )
            assert done["status"] == "succeeded", done["error"]
            messages = [
                e["message"]
                for e in c.get(
                    f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}
                ).json()["data"]
            ]
            assert any("server is stopping" in m for m in messages)
            assert any("restarted while this job was running" in m for m in messages)
            assert any("attempt 3" in m for m in messages)
            assert c.get("/users/ft-rex/adapter").status_code == 200
    finally:
        server.stop()
