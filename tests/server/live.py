"""Start a real ``python -m server`` process on a free loopback port for end-to-end tests."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from vera_core import Adapter, AdapterHeader, VeraModel, model_fingerprint
from vera_core.adapter_file import adapter_to_bytes
from vera_core.merge import merge, unmerge
from vera_core.peft_compat import save_peft_dir

ADMIN = "test-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen
    store: Path | str  # a directory, or a postgresql:// URL
    log: Path
    admin_token: str | None

    def client(self, token: str | None = None, timeout: float = 300.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def admin(self) -> httpx.Client:
        return self.client(self.admin_token)

    def new_user(self, user_id: str) -> str:
        with self.admin() as c:
            r = c.post("/admin/users", json={"user_id": user_id, "rotate": True})
            assert r.status_code == 201, r.text
            return r.json()["api_key"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(
    workdir: Path,
    *args: str,
    admin_token: str | None = ADMIN,
    store: Path | str | None = None,
) -> LiveServer:
    port = free_port()
    store = store or workdir / "store"
    log = workdir / f"server-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VERA_LOG_LEVEL": "info"}
    env.pop("VERA_ADMIN_TOKEN", None)
    if admin_token:
        env["VERA_ADMIN_TOKEN"] = admin_token
    if "--dtype" not in args:  # exact-token checks compare with fp32 references; the bf16
        args = ("--dtype", "float32", *args)  # default has its own bounded parity test
    if "--compile" not in args:  # no background compile competing with the tests for the CPU
        args = ("--compile", "off", *args)
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--store", str(store), *args]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    live = LiveServer(f"http://127.0.0.1:{port}", proc, store, log, admin_token)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{live.log_text()[-3000:]}")
        try:
            if httpx.get(f"{live.url}/health", timeout=2).status_code == 200:
                return live
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    live.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not come up:\n{live.log_text()[-3000:]}")


def random_adapter(vm: VeraModel, seed: int, scale: float = 1.0) -> Adapter:
    """Non-trivial vectors that visibly change greedy output on SmolLM2."""
    g = torch.Generator().manual_seed(seed)
    header = AdapterHeader(
        r=vm.layout.r,
        projection_prng_key=vm.config.projection_prng_key,
        target_modules=vm.config.resolved_targets(vm.model.config.model_type),
        base_fingerprint=model_fingerprint(vm.model),
    )
    vectors = {}
    for spec in vm.layout.layers:
        d = torch.randn(vm.layout.r, generator=g) * scale
        b = torch.randn(spec.out_features, generator=g) * 0.2 * scale
        vectors[spec.name] = (d, b)
    return Adapter(header, vectors)


def adapter_bytes(adapter: Adapter) -> bytes:
    return adapter_to_bytes(adapter)


def peft_zip(adapter: Adapter, vm: VeraModel, tmp: Path, save_projection: bool = True) -> bytes:
    folder = tmp / f"peft-{id(adapter)}"
    save_peft_dir(adapter, vm, folder, save_projection=save_projection)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, arcname=f"my-adapter/{f.name}")
    return buf.getvalue()


def merged_greedy(
    vm: VeraModel, adapter: Adapter | None, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    """transformers ``generate`` (greedy) with ``adapter`` merged into the weights."""
    if adapter is not None:
        merge(vm, adapter)
    try:
        with torch.no_grad():
            out = vm.model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False
            )
    finally:
        unmerge(vm)
    new = out[0, len(prompt_ids) :].tolist()
    eos = vm.model.generation_config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    return new[:-1] if new and new[-1] in eos_ids else new


def build_tiny_model(folder: Path) -> Path:
    """A random LlamaForCausalLM with the default model's tokenizer, saved as an HF dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from server.model_source import load_model

    _, tokenizer, _ = load_model()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
