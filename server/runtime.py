"""Everything one server process holds: model, shared VeRA state, store, slots, engine."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from adapters_store import AdapterStore
from server.adapter_service import AdapterService
from server.auth import KeyRegistry
from server.config import ServerConfig, vera_home
from server.engine import Engine, EngineConfig, SlotPool, cpu_threads
from server.engine.compile import use_compile_cache
from server.engine.fair_queue import FairnessConfig
from server.engine.scheduler import SchedulerConfig
from server.finetune.service import FineTuningService
from server.finetune.worker import FineTuneConfig, JobWorker
from server.heap import HeapReleaser
from server.model_source import load_model
from server.storage import Storage, open_storage
from server.tenants import Limits, Tenants, UsageMeter
from vera_core import VeraConfig, VeraModel, inject_vera, model_fingerprint
from vera_core.train_data import DataLimits

log = logging.getLogger("vera-serve")


def engine_config_for(config: ServerConfig, device: torch.device) -> EngineConfig:
    """The engine a server with ``config`` runs on ``device`` (also what the benchmarks run)."""
    return EngineConfig(
        scheduler=SchedulerConfig(
            max_batch=config.max_batch,
            max_prefill_tokens=config.max_prefill_tokens,
            idle_prefill_tokens=config.idle_prefill_tokens,
            max_waiting=config.max_waiting,
            max_waiting_per_client=config.max_waiting_per_user,
            share_prefix_tokens=config.share_prefix_tokens,
            prefix_cache_bytes=config.prefix_cache_mb << 20,
            fairness=FairnessConfig(
                policy=config.scheduling,
                input_weight=config.fair_input_weight,
                output_weight=config.fair_output_weight,
            ),
        ),
        max_seq_len=config.max_seq_len,
        background_share=config.train_share,
        compile=config.compile_mode,
        # CUDA graphs replay fixed shapes: bucketed batches over a preallocated KV cache
        static_decode=config.compile_mode == "startup" and device.type == "cuda",
        packed_linears=config.packed_weights,
    )


@dataclass
class Runtime:
    config: ServerConfig
    vm: VeraModel
    tokenizer: PreTrainedTokenizerBase
    model_name: str
    storage: Storage  # --store: one database for adapters, API keys and fine-tuning jobs
    store: AdapterStore
    pool: SlotPool
    adapters: AdapterService
    engine: Engine
    fine_tuning: FineTuningService
    tenants: Tenants  # limits, rate limiter, usage meter
    base_model_bytes: int
    heap: HeapReleaser  # gives freed heap back to the OS when the engine is idle

    @property
    def users(self) -> KeyRegistry:
        return self.storage.keys

    @classmethod
    def build(cls, config: ServerConfig) -> Runtime:
        t0 = time.perf_counter()
        device, dtype = config.torch_device, config.torch_dtype
        # on a CPU the engine thread alone runs torch on every core (engine/cpu_threads.py)
        threads = cpu_threads.reserve_for_engine() if device.type == "cpu" else 0
        model, tokenizer, path = load_model(config.model, dtype=dtype, device=str(device))
        base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        vera_config = VeraConfig(
            r=config.r,
            projection_prng_key=config.projection_prng_key,
            target_modules=config.targets,
        )
        # bank and shared A/B in fp32 whatever the model's dtype (PEFT's arithmetic under bf16)
        vm = inject_vera(model, vera_config, num_slots=config.device_slots + 1)
        fingerprint = model_fingerprint(model)
        storage = open_storage(config.store_location)
        owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        tenants = Tenants.open(storage.db, default_limits(config), path.name, owner)
        store = AdapterStore(storage.adapters, vm.layout, config.projection_prng_key, fingerprint)
        pool = SlotPool(vm.bank, store, config.host_slots, acquire_timeout_s=config.slot_wait_s)
        adapters = AdapterService(store, pool)
        engine_config = replace(engine_config_for(config, device), cpu_threads=threads)
        if engine_config.compile != "off":  # kernels kept across restarts; before any compile
            use_compile_cache(vera_home() / "compile-cache")
        engine = Engine(vm, tokenizer, pool, engine_config, tenants.limits)
        engine.stats.observers.append(tenants.usage)
        if engine_config.compile == "startup":
            mode = engine.decode_mode()
            log.info("compiling the decode step (--compile %s): %s", config.compile, mode)
            log.info("decode step compiled and warmed in %.1f s", engine.warm_up())
        elif engine_config.compile == "background":
            log.info("the decode step compiles in the background; eager until it is warm")
        fine_tuning = _fine_tuning(
            config, storage, engine, vm, tokenizer, adapters, path.name, owner, tenants.usage
        )
        rt = cls(
            config=config,
            vm=vm,
            tokenizer=tokenizer,
            model_name=path.name,
            storage=storage,
            store=store,
            pool=pool,
            adapters=adapters,
            engine=engine,
            fine_tuning=fine_tuning,
            tenants=tenants,
            base_model_bytes=base_bytes,
            heap=HeapReleaser(idle=lambda: engine.running() == 0 and engine.queue_depth() == 0),
        )
        rt._log_startup(path, time.perf_counter() - t0)
        return rt

    def _log_startup(self, path: Path, seconds: float) -> None:
        mib = 1024 * 1024
        vm = self.vm
        log.info(
            "loaded %s from %s on %s (%s) in %.1f s: base model %.1f MiB, shared A/B %.2f MiB, "
            "%d adapted layers (%s), r=%d, %d params/adapter (%.1f KiB), device slots %d "
            "(%.1f MiB), store %s with %d adapters, process RSS %.0f MiB",
            self.model_name,
            path,
            self.config.torch_device,
            str(self.config.torch_dtype),
            seconds,
            self.base_model_bytes / mib,
            vm.projections.nbytes() / mib,
            len(vm.layers),
            ",".join(vm.config.resolved_targets(vm.model.config.model_type)),
            vm.layout.r,
            vm.layout.num_params,
            vm.layout.num_params * vm.bank.rows.element_size() / 1024,
            self.config.device_slots,
            vm.bank.nbytes() / mib,
            self.storage.description,
            len(self.store.list()),
            self.memory()["host_rss_bytes"] / mib,
        )
        if self.config.dev_mode:
            banner = "!" * 78
            log.warning(
                "\n%s\n  DEV MODE: VERA_ADMIN_TOKEN is not set, so there is NO AUTHENTICATION.\n"
                "  Anyone who can reach %s:%d can read, upload and delete every adapter.\n"
                "  Bound to loopback only. Set VERA_ADMIN_TOKEN for any shared use.\n%s",
                banner,
                self.config.host,
                self.config.port,
                banner,
            )

    def start(self) -> None:
        self.tenants.start()
        self.engine.start()
        self.fine_tuning.worker.start()
        self.heap.start()

    def shutdown(self) -> None:
        self.heap.stop()
        self.fine_tuning.worker.stop()  # a running job goes back to the queue
        self.engine.stop()
        self.tenants.stop()  # after the engine: the last requests' usage is flushed
        self.pool.close()
        self.storage.close()

    def memory(self) -> dict[str, Any]:
        import psutil

        out: dict[str, Any] = {"host_rss_bytes": psutil.Process().memory_info().rss}
        if self.config.torch_device.type == "cuda":
            out["device_allocated_bytes"] = torch.cuda.memory_allocated()
            out["device_reserved_bytes"] = torch.cuda.memory_reserved()
        out["base_model_bytes"] = self.base_model_bytes
        out["shared_projection_bytes"] = self.vm.projections.nbytes()
        out["adapter_bank_bytes"] = self.vm.bank.nbytes()
        out["kv_cache_bytes"] = self.engine.kv_cache_bytes()
        out["prefix_cache_bytes"] = self.engine.scheduler.prefixes.nbytes
        out["packed_weights_bytes"] = self.engine.packed_weights_bytes()
        return out


def default_limits(config: ServerConfig) -> Limits:
    """Every user's limits unless the admin set an override (0 = unlimited)."""
    return Limits(
        weight=1.0,
        requests_per_minute=config.user_requests_per_minute,
        tokens_per_minute=config.user_tokens_per_minute,
        max_concurrent=config.user_max_concurrent,
        max_queued=config.max_waiting_per_user,
    )


def _fine_tuning(
    config: ServerConfig,
    storage: Storage,
    engine: Engine,
    vm: VeraModel,
    tokenizer: PreTrainedTokenizerBase,
    adapters: AdapterService,
    model_name: str,
    owner: str,
    usage: UsageMeter,
) -> FineTuningService:
    limits = DataLimits(
        max_bytes=config.max_training_file_bytes,
        max_examples=config.max_training_examples,
        max_example_tokens=engine.context_limit,
        max_total_tokens=config.max_training_tokens,
    )
    ft_config = FineTuneConfig(
        limits,
        max_queued_jobs=config.max_jobs,
        min_retention=config.min_retention,
        anchor_weight=config.anchor_weight,
        reference_dir=vera_home() / "references",
    )
    exclusive = storage.db.exclusive  # a directory has one server
    worker = JobWorker(
        storage.jobs,
        engine,
        vm,
        tokenizer,
        adapters,
        ft_config,
        owner,
        exclusive,
        on_trained=usage.trained,
    )
    return FineTuningService(storage.jobs, tokenizer, model_name, ft_config, worker)
