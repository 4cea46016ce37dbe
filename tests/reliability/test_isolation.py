"""Tenant isolation: a user key reaches only its own adapter, through every endpoint (native
and OpenAI-compatible); admin endpoints refuse user keys; keys are stored hashed and compared in
constant time; no key, adapter byte or other user's id leaks in errors or logs."""

from __future__ import annotations

import hashlib
import inspect
import sqlite3
from collections.abc import Iterator

import httpx
import pytest
from kit import OCTET, stored_bytes, tiny_adapter
from live import ADMIN, LiveServer, adapter_bytes, random_adapter, start_server

from server.api import auth
from server.auth import KeyRegistry

MARKER = b"SECRET-ADAPTER-BYTES-7f3a"


def cross_tenant_requests(c: httpx.Client, victim: str, body: bytes) -> list[httpx.Response]:
    """Every way a key could touch ``victim``'s adapter."""
    chat = {"model": victim, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return [
        c.post("/generate", json={"user_id": victim, "prompt": "hi", "max_new_tokens": 2}),
        c.post("/generate", json={"user_id": victim, "prompt": "hi", "stream": True}),
        c.get(f"/users/{victim}/adapter"),
        c.put(f"/users/{victim}/adapter", content=body, headers=OCTET),
        c.delete(f"/users/{victim}/adapter"),
        c.post("/v1/completions", json={"model": victim, "prompt": "hi", "max_tokens": 2}),
        c.post("/v1/completions", json={"model": victim, "prompt": "hi", "stream": True}),
        c.post("/v1/chat/completions", json=chat),
        c.post("/v1/chat/completions", json={**chat, "stream": True}),
    ]


@pytest.fixture(scope="module")
def tenants(tiny_auth: LiveServer, tvm) -> dict[str, str]:
    keys = {uid: tiny_auth.new_user(uid) for uid in ("alice", "bruno")}
    for uid, seed in (("alice", 11), ("bruno", 12)):
        with tiny_auth.client(keys[uid]) as c:
            body = stored_bytes(tiny_adapter(tvm, seed), tvm)
            assert c.put(f"/users/{uid}/adapter", content=body, headers=OCTET).status_code == 201
    return keys


def test_user_cannot_touch_another_users_adapter(tiny_auth: LiveServer, tvm, tenants) -> None:
    with tiny_auth.client(tenants["bruno"]) as c:
        before = c.get("/users/bruno/adapter").json()
    body = stored_bytes(tiny_adapter(tvm, 99), tvm)
    with tiny_auth.client(tenants["alice"]) as c:
        for victim in ("bruno", "nobody-here"):  # existing or not: the same answer, no oracle
            for r in cross_tenant_requests(c, victim, body):
                assert r.status_code == 403, (r.request.method, r.request.url, r.text)
                msg = r.json()["error"]["message"]
                assert victim not in msg and "alice" not in msg, msg
        models = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert "bruno" not in models and "alice" in models
    with tiny_auth.client(tenants["bruno"]) as c:  # bruno's adapter is exactly as it was
        assert c.get("/users/bruno/adapter").json() == before


def test_admin_endpoints_refuse_user_keys(tiny_auth: LiveServer, tenants) -> None:
    with tiny_auth.client(tenants["alice"]) as c:
        for r in (
            c.post("/admin/users", json={"user_id": "evil"}),
            c.post("/admin/users", json={"user_id": "bruno", "rotate": True}),
            c.get("/admin/stats"),
        ):
            assert r.status_code == 403, r.text
    with tiny_auth.client(tenants["bruno"]) as c:  # bruno's key was not rotated
        assert c.get("/users/bruno/adapter").status_code == 200
    for token in ("", "vk-forged", tenants["alice"] + "x", ADMIN + "x", ADMIN[:-1]):
        with tiny_auth.client(token or None) as c:
            r = c.get("/admin/stats")
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text


def test_keys_are_stored_hashed(tiny_auth: LiveServer, tenants) -> None:
    db = sqlite3.connect(tiny_auth.store / "vera.sqlite")
    try:
        rows = dict(db.execute("SELECT user_id, key_sha256 FROM vera_users").fetchall())
    finally:
        db.close()
    for uid, key in tenants.items():
        assert rows[uid] == hashlib.sha256(key.encode()).hexdigest()
    for path in tiny_auth.store.rglob("*"):  # the plain key is nowhere on disk
        if path.is_file():
            data = path.read_bytes()
            assert all(key.encode() not in data for key in tenants.values()), path


def test_keys_are_compared_in_constant_time() -> None:
    """The admin token and user-key digests go through hmac.compare_digest, and a user key is
    looked up by its SHA-256 (an index probe on a digest, not a comparison of secrets)."""
    assert "hmac.compare_digest" in inspect.getsource(auth.principal)
    source = inspect.getsource(KeyRegistry.authenticate)
    assert "hmac.compare_digest" in source and "_digest(key)" in source
    assert "== token" not in inspect.getsource(auth) and "token ==" not in inspect.getsource(auth)


def test_no_secret_leaks_in_errors_or_log(tiny_auth: LiveServer, tenants) -> None:
    bad = MARKER * 64
    with tiny_auth.client(tenants["alice"]) as c:
        replies = [
            c.put("/users/alice/adapter", content=bad, headers=OCTET),
            c.put("/users/alice/adapter", content=bad, headers={"Content-Type": "application/zip"}),
            c.put("/users/alice/adapter", content=bad, headers={"Content-Type": "text/plain"}),
            c.put("/users/alice/adapter", content=b"\x10\x00\x00\x00\x00\x00\x00\x00" + bad),
        ]
    for r in replies:
        assert 400 <= r.status_code < 500 and MARKER not in r.content, r.text
    log = tiny_auth.log_text()
    for key in (*tenants.values(), ADMIN):
        assert key not in log
    assert MARKER.decode() not in log
    problems = [ln for ln in log.splitlines() if " ERROR " in ln or " WARNING " in ln]
    for line in problems:  # error lines name no user at all (ids only in access lines)
        assert not any(uid in line for uid in tenants), line
    assert "Traceback" not in log


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Iterator[LiveServer]:
    """The real default model, auth on: isolation where real generation runs."""
    server = start_server(tmp_path_factory.mktemp("real-iso"), "--device-slots", "4")
    yield server
    server.stop()


@pytest.mark.slow
def test_isolation_on_the_real_model(real: LiveServer) -> None:
    from server.model_source import load_model
    from vera_core import VeraConfig, inject_vera

    model, _, _ = load_model()
    vm = inject_vera(model, VeraConfig(r=256), num_slots=2)
    keys = {uid: real.new_user(uid) for uid in ("carol", "dave")}
    bodies = {
        uid: adapter_bytes(random_adapter(vm, seed)) for uid, seed in (("carol", 1), ("dave", 2))
    }
    for uid, key in keys.items():
        with real.client(key) as c:
            assert (
                c.put(f"/users/{uid}/adapter", content=bodies[uid], headers=OCTET).status_code
                == 201
            )
    with real.client(keys["carol"]) as c:
        own = c.post("/generate", json={"user_id": "carol", "prompt": "Hi", "max_new_tokens": 3})
        assert own.status_code == 200, own.text
        for r in cross_tenant_requests(c, "dave", bodies["carol"]):
            assert r.status_code == 403, (r.request.url, r.text)
        assert {m["id"] for m in c.get("/v1/models").json()["data"]} == {
            c.get("/v1/models").json()["data"][0]["id"],
            "carol",
        }
    with real.client(keys["dave"]) as c:
        assert c.get("/users/dave/adapter").json()["version"] == 1
    log = real.log_text()
    assert all(k not in log for k in keys.values()) and ADMIN not in log
