"""Bad uploads: each is refused with a 4xx whose message names the problem, nothing is stored,
and every other user keeps being served."""

from __future__ import annotations

import io
import json
import random
import stat
import zipfile
from dataclasses import replace

import pytest
import torch
from kit import error_message, stored_bytes, temp_files, tiny_adapter
from live import LiveServer, peft_zip

from vera_core import Adapter
from vera_core.adapter_file import adapter_to_bytes

VICTIM, BYSTANDER = "mallory", "bob"
OCTET, ZIP = "application/octet-stream", "application/zip"


@pytest.fixture(scope="module")
def setup(tiny_auth: LiveServer, tvm, tmp_path_factory) -> dict:
    """``mallory`` has a good adapter (v1) that bad uploads must not touch; ``bob`` generates."""
    keys = {uid: tiny_auth.new_user(uid) for uid in (VICTIM, BYSTANDER)}
    for uid, seed in ((VICTIM, 1), (BYSTANDER, 2)):
        with tiny_auth.client(keys[uid]) as c:
            body = stored_bytes(tiny_adapter(tvm, seed), tvm)
            assert (
                c.put(
                    f"/users/{uid}/adapter", content=body, headers={"Content-Type": OCTET}
                ).status_code
                == 201
            )
    with tiny_auth.client(keys[VICTIM]) as c:
        sha = c.get(f"/users/{VICTIM}/adapter").json()["sha256"]
    good = tiny_adapter(tvm, 1)
    return {
        "keys": keys,
        "sha": sha,
        "good": good,
        "good_bytes": stored_bytes(good, tvm),
        "peft_dir": tmp_path_factory.mktemp("peft"),
    }


def _with_vectors(adapter: Adapter, fn) -> bytes:
    vectors = {name: fn(d.clone(), b.clone()) for name, (d, b) in adapter.vectors.items()}
    return adapter_to_bytes(Adapter(adapter.header, vectors))


def _zip(entries: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _peft_files(setup: dict, tvm) -> dict[str, bytes]:
    data = peft_zip(setup["good"], tvm, setup["peft_dir"])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n.rsplit("/", 1)[-1]: zf.read(n) for n in zf.namelist()}


def _peft_with_config(setup: dict, tvm, **changes) -> bytes:
    files = _peft_files(setup, tvm)
    cfg = {**json.loads(files["adapter_config.json"]), **changes}
    return _zip({"a/adapter_config.json": json.dumps(cfg), **_weights(files)})


def _weights(files: dict[str, bytes]) -> dict[str, bytes]:
    return {"a/adapter_model.safetensors": files["adapter_model.safetensors"]}


def _lying_offsets(good: bytes) -> bytes:
    """Same file, but the header says the first tensor ends far past the end of the data."""
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 10**9]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + good[8 + n :]


def _header_claims(good: bytes, size: int) -> bytes:
    return size.to_bytes(8, "little") + good[8:]


def _metadata(adapter: Adapter, **changes: str) -> bytes:
    """A file whose ``__metadata__`` has ``changes`` applied (e.g. a non-list target_modules)."""
    from safetensors.torch import load, save

    good = adapter_to_bytes(adapter)
    n = int.from_bytes(good[:8], "little")
    meta = {**json.loads(good[8 : 8 + n])["__metadata__"], **changes}
    return save(load(good), metadata=meta)


# name -> (content type, body builder(setup, tvm), expected status, words the message must hold)
CASES = {
    "wrong_shape_d": (
        OCTET,
        lambda s, vm: _with_vectors(s["good"], lambda d, b: (torch.zeros(d.numel() + 1), b)),
        400,
        ["shape"],
    ),
    "wrong_shape_b": (
        OCTET,
        lambda s, vm: _with_vectors(s["good"], lambda d, b: (d, torch.zeros(3, 3))),
        400,
        ["shape"],
    ),
    "wrong_dtype_int": (
        OCTET,
        lambda s, vm: _with_vectors(s["good"], lambda d, b: (d.to(torch.int32), b)),
        400,
        ["dtype"],
    ),
    "nan": (
        OCTET,
        lambda s, vm: _with_vectors(s["good"], lambda d, b: (d.fill_(float("nan")), b)),
        400,
        ["nan"],
    ),
    "inf": (
        OCTET,
        lambda s, vm: _with_vectors(s["good"], lambda d, b: (d, b.fill_(float("inf")))),
        400,
        ["inf"],
    ),
    "absurd_magnitude": (
        OCTET,
        lambda s, vm: _with_vectors(s["good"], lambda d, b: (d.fill_(1e30), b)),
        400,
        ["|value|"],
    ),
    "truncated": (
        OCTET,
        lambda s, vm: s["good_bytes"][: len(s["good_bytes"]) // 2],
        400,
        ["trunc"],
    ),
    "garbage": (OCTET, lambda s, vm: random.Random(0).randbytes(4096), 400, ["safetensors"]),
    "tiny_body": (OCTET, lambda s, vm: b"\x01\x02", 400, ["truncated"]),
    "header_lies_about_offsets": (
        OCTET,
        lambda s, vm: _lying_offsets(s["good_bytes"]),
        400,
        ["safetensors"],
    ),
    "header_length_lies": (
        OCTET,
        lambda s, vm: _header_claims(s["good_bytes"], 2**63),
        400,
        ["header"],
    ),
    "target_modules_not_a_list": (
        OCTET,
        lambda s, vm: _metadata(s["good"], target_modules="5"),
        400,
        ["malformed"],
    ),
    "other_base_model": (
        OCTET,
        lambda s, vm: adapter_to_bytes(
            Adapter(
                replace(s["good"].header, base_fingerprint="0123456789abcdef"), s["good"].vectors
            )
        ),
        400,
        ["base model"],
    ),
    "zip_bomb": (
        ZIP,
        lambda s, vm: _zip(
            {"a/adapter_config.json": b"{}", "a/adapter_model.safetensors": bytes(64 << 20)}
        ),
        413,
        ["unpacks"],
    ),
    "zip_dotdot": (
        ZIP,
        lambda s, vm: _zip({"../adapter_config.json": b"{}", "a/adapter_model.safetensors": b""}),
        400,
        ["unsafe path"],
    ),
    "zip_absolute": (
        ZIP,
        lambda s, vm: _zip({"/etc/adapter_config.json": b"{}"}),
        400,
        ["unsafe path"],
    ),
    "zip_symlink": (
        ZIP,
        lambda s, vm: _zip({"a/adapter_config.json": b"{}"}, ("a/adapter_model.safetensors",)),
        400,
        ["symbolic link"],
    ),
    "zip_missing_weights": (
        ZIP,
        lambda s, vm: _zip({"a/adapter_config.json": _peft_files(s, vm)["adapter_config.json"]}),
        400,
        ["adapter_model.safetensors"],
    ),
    "zip_missing_config": (ZIP, lambda s, vm: _zip(_weights(_peft_files(s, vm))), 400, ["config"]),
    "zip_garbage": (ZIP, lambda s, vm: b"PK\x03\x04" + bytes(100), 400, ["zip"]),
    "peft_type_lora": (
        ZIP,
        lambda s, vm: _peft_with_config(s, vm, peft_type="LORA"),
        400,
        ["peft_type"],
    ),
    "peft_other_r": (ZIP, lambda s, vm: _peft_with_config(s, vm, r=8), 400, ["r"]),
    "peft_other_key": (
        ZIP,
        lambda s, vm: _peft_with_config(s, vm, projection_prng_key=7),
        400,
        ["projection_prng_key"],
    ),
    "peft_targets_name_a_layer_without_vectors": (
        ZIP,
        lambda s, vm: _peft_with_config(s, vm, target_modules=["q_proj", "k_proj", "v_proj"]),
        400,
        ["target_modules", "k_proj", "no vectors"],
    ),
    "peft_vectors_outside_targets": (
        ZIP,
        lambda s, vm: _peft_with_config(s, vm, target_modules=["q_proj"]),
        400,
        ["target_modules", "v_proj", "no target"],
    ),
    "peft_config_not_json": (
        ZIP,
        lambda s, vm: _zip({"a/adapter_config.json": b"{nope", **_weights(_peft_files(s, vm))}),
        400,
        ["json"],
    ),
    "body_over_limit": (OCTET, lambda s, vm: bytes((1 << 20) + 1), 413, ["limit"]),
    "content_type_text": ("text/plain", lambda s, vm: s["good_bytes"], 415, ["content-type"]),
    "content_type_json": ("application/json", lambda s, vm: s["good_bytes"], 415, ["content-type"]),
    "content_type_missing": ("", lambda s, vm: s["good_bytes"], 415, ["content-type"]),
    "empty_body": (OCTET, lambda s, vm: b"", 400, ["empty"]),
}


def _assert_untouched(server: LiveServer, setup: dict) -> None:
    keys = setup["keys"]
    with server.client(keys[VICTIM]) as c:
        assert c.get(f"/users/{VICTIM}/adapter").json()["sha256"] == setup["sha"]
    with server.client(keys[BYSTANDER]) as c:
        r = c.post("/generate", json={"user_id": BYSTANDER, "prompt": "hi", "max_new_tokens": 2})
        assert r.status_code == 200, r.text
    assert not temp_files(server.store)
    assert len(list((server.store / "adapters" / VICTIM).iterdir())) == 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_upload_is_refused(case: str, tiny_auth: LiveServer, tvm, setup: dict) -> None:
    content_type, build, status, words = CASES[case]
    body = build(setup, tvm)
    headers = {"Content-Type": content_type} if content_type else {}
    with tiny_auth.client(setup["keys"][VICTIM]) as c:
        r = c.put(f"/users/{VICTIM}/adapter", content=body, headers=headers)
    assert r.status_code == status, (case, r.status_code, r.text)
    message = error_message(r).lower()
    assert any(w in message for w in words), (case, message)
    _assert_untouched(tiny_auth, setup)


def test_streamed_body_over_limit_is_refused(tiny_auth: LiveServer, setup: dict) -> None:
    """No Content-Length (chunked): the limit is enforced while reading."""

    def chunks():
        for _ in range(40):
            yield bytes(64 << 10)

    with tiny_auth.client(setup["keys"][VICTIM]) as c:
        r = c.put(f"/users/{VICTIM}/adapter", content=chunks(), headers={"Content-Type": OCTET})
    assert r.status_code == 413 and "limit" in error_message(r)
    _assert_untouched(tiny_auth, setup)


def test_random_corruptions_never_5xx(tiny_auth: LiveServer, setup: dict) -> None:
    """200 random byte flips / truncations of a good file: stored whole (201) or a 4xx."""
    rng = random.Random(1234)
    good = setup["good_bytes"]
    outcomes: dict[int, int] = {}
    with tiny_auth.client(setup["keys"][BYSTANDER]) as c:
        for _ in range(200):
            data = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.2:
                data = data[: rng.randrange(len(data))]
            r = c.put(
                f"/users/{BYSTANDER}/adapter", content=bytes(data), headers={"Content-Type": OCTET}
            )
            outcomes[r.status_code] = outcomes.get(r.status_code, 0) + 1
            assert r.status_code == 201 or 400 <= r.status_code < 500, r.text
            if r.status_code != 201:
                error_message(r)
        assert (
            c.put(
                f"/users/{BYSTANDER}/adapter", content=good, headers={"Content-Type": OCTET}
            ).status_code
            == 201
        )
    assert outcomes.get(400, 0) > 0
    _assert_untouched(tiny_auth, setup)


def test_bad_uploads_leave_no_adapter_for_a_new_user(tiny_auth: LiveServer, setup: dict) -> None:
    key = tiny_auth.new_user("newcomer")
    with tiny_auth.client(key) as c:
        for body in (b"garbage", setup["good_bytes"][:100]):
            assert (
                c.put(
                    "/users/newcomer/adapter", content=body, headers={"Content-Type": OCTET}
                ).status_code
                == 400
            )
        assert c.get("/users/newcomer/adapter").status_code == 404
    assert not (tiny_auth.store / "adapters" / "newcomer").exists() or not list(
        (tiny_auth.store / "adapters" / "newcomer").glob("v*")
    )
