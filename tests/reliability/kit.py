"""Shared helpers of the reliability suite: a tiny random Llama, its adapters, a server on it.

The tiny model (hidden 64, 2 layers) keeps fuzzing, fault injection and the soak fast while
every request still goes through the real ``python -m server`` process end to end.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))

from live import ADMIN as ADMIN_TOKEN  # noqa: E402
from live import LiveServer, build_tiny_model, random_adapter, start_server  # noqa: E402

from vera_core import Adapter, VeraConfig, VeraModel, inject_vera, model_fingerprint  # noqa: E402
from vera_core.adapter_file import adapter_to_bytes  # noqa: E402

__all__ = ["ADMIN_TOKEN", "LiveServer", "build_tiny_model"]

TINY_R = 16
OCTET = {"Content-Type": "application/octet-stream"}
ZIP = {"Content-Type": "application/zip"}


def tiny_vm(folder: Path) -> VeraModel:
    """The tiny model with the server's shared projections, as the server builds them."""
    from server.model_source import load_model

    model, _, _ = load_model(str(folder))
    return inject_vera(model, VeraConfig(r=TINY_R), num_slots=2)


def tiny_adapter(vm: VeraModel, seed: int) -> Adapter:
    return random_adapter(vm, seed)


def stored_bytes(adapter: Adapter, vm: VeraModel) -> bytes:
    """The exact file the store writes: it re-serializes with this model's fingerprint."""
    header = replace(adapter.header, base_fingerprint=model_fingerprint(vm.model))
    return adapter_to_bytes(Adapter(header, adapter.vectors))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def start_tiny(workdir: Path, model_dir: Path, *args: str, **kw) -> LiveServer:
    return start_server(
        workdir, "--model", str(model_dir), "--r", str(TINY_R), "--max-seq-len", "256", *args, **kw
    )


def wait_idle(server: LiveServer, token: str | None, timeout: float = 30.0) -> dict:
    """Poll /admin/stats until nothing runs, waits or pins a slot; return the last stats."""
    deadline = time.time() + timeout
    with server.client(token, timeout=10) as c:
        while True:
            stats = c.get("/admin/stats").json()
            eng, ad = stats["engine"], stats["adapters"]
            idle = eng["running_batch"] == 0 and eng["queue_depth"] == 0
            if idle and ad["slots_pinned"] == 0 or time.time() > deadline:
                return stats
            time.sleep(0.2)


def error_message(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"] and body["error"]["code"] == r.status_code, body
    return body["error"]["message"]


def temp_files(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.name.startswith(".tmp") or p.suffix == ".tmp"]
