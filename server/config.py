"""Server configuration: one frozen dataclass, filled from CLI flags or ``VERA_*`` env vars."""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from adapters_store import is_database_url
from server.engine.fair_queue import POLICIES
from vera_core.config import parse_targets

COMPILE_MODES = ("auto", "background", "on", "off")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ServerConfig:
    model: str = field(
        default="default",
        metadata={"help": "HF causal-LM directory, or 'default' (embedded SmolLM2-135M-Instruct)"},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "bind address"})
    port: int = field(default=8000, metadata={"help": "bind port"})
    store: str = field(
        default="",
        metadata={
            "help": "adapter store: a directory (default $VERA_HOME/store) or a "
            "postgresql://USER@HOST:PORT/DB URL shared by several replicas"
        },
    )
    device: str = field(
        default="auto", metadata={"help": "auto (CUDA when present), cpu, cuda or cuda:N"}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (bfloat16 on CUDA and on CPUs with AMX/AVX512-BF16, else float32), "
            "float32, bfloat16 or float16"
        },
    )
    r: int = field(default=256, metadata={"help": "VeRA rank of the shared projections"})
    projection_prng_key: int = field(default=0, metadata={"help": "seed of the shared projections"})
    target_modules: str = field(
        default="", metadata={"help": "comma-separated targets; empty = PEFT default for the model"}
    )
    max_batch: int = field(default=64, metadata={"help": "max sequences decoded together"})
    max_waiting: int = field(default=512, metadata={"help": "queue bound; beyond it 429"})
    max_waiting_per_user: int = field(
        default=128,
        metadata={
            "help": "requests one user (tenant) may have queued; beyond it that user gets 429 "
            "while others are still admitted (per-user override: admin limits API)"
        },
    )
    user_requests_per_minute: int = field(
        default=0,
        metadata={"help": "requests one user may send per minute; 0 = unlimited (429 beyond)"},
    )
    user_tokens_per_minute: int = field(
        default=0,
        metadata={"help": "prompt + max new tokens one user may ask for per minute; 0 = unlimited"},
    )
    user_max_concurrent: int = field(
        default=0, metadata={"help": "requests one user may have in flight; 0 = unlimited"}
    )
    scheduling: str = field(
        default="fair",
        metadata={
            "help": "fair: users share the engine by virtual token counters, a flooding user "
            "is preempted for one below its share; fifo: first come, first served"
        },
    )
    fair_input_weight: float = field(
        default=1.0, metadata={"help": "fair scheduling: counter charge per prompt token"}
    )
    fair_output_weight: float = field(
        default=2.0, metadata={"help": "fair scheduling: counter charge per generated token"}
    )
    max_prefill_tokens: int = field(
        default=512,
        metadata={
            "help": "prompt tokens prefilled per step; longer prompts and bursts are chunked "
            "over steps while running streams keep decoding"
        },
    )
    idle_prefill_tokens: int = field(
        default=2048,
        metadata={
            "help": "prompt tokens prefilled in a step when no stream is decoding (a burst "
            "into an idle server): larger forwards run faster, and no stream waits on them"
        },
    )
    share_prefix_tokens: int = field(
        default=16,
        metadata={
            "help": "a prompt beginning with at least this many tokens of a live request's "
            "prompt (same tenant, same adapter) copies their K/V instead of computing them "
            "(0: only identical prompts)"
        },
    )
    prefix_cache_mb: int = field(
        default=512,
        metadata={
            "help": "memory (MiB) for the K/V of finished requests, kept for prompts that "
            "begin with them (a conversation's next turn; same tenant, same adapter) and "
            "restored instead of computed (0: none kept; none either with --share-prefix-tokens 0)"
        },
    )
    max_seq_len: int = field(default=2048, metadata={"help": "max prompt + generated tokens"})
    device_slots: int = field(default=256, metadata={"help": "adapters resident on the device"})
    host_slots: int = field(default=4096, metadata={"help": "adapters cached in host memory"})
    slot_wait_s: float = field(
        default=30.0, metadata={"help": "how long a request waits for a free slot"}
    )
    max_body_mb: float = field(default=64.0, metadata={"help": "request body limit (MB)"})
    train_share: float = field(
        default=0.2,
        metadata={
            "help": "share of engine time a fine-tuning job may take while requests are in "
            "flight (idle: all of it)"
        },
    )
    max_jobs: int = field(
        default=16, metadata={"help": "fine-tuning jobs queued or running at once; beyond: 429"}
    )
    max_training_file_mb: float = field(
        default=16.0, metadata={"help": "size limit of one fine-tuning file (MB)"}
    )
    max_training_examples: int = field(
        default=10_000, metadata={"help": "examples in one fine-tuning file"}
    )
    max_training_tokens: int = field(
        default=2_000_000, metadata={"help": "tokens in one fine-tuning file"}
    )
    min_retention: float = field(
        default=0.5,
        metadata={
            "help": "a fine-tuning job whose adapter keeps fewer of the base model's right "
            "answers to held-out general questions than this share is not published "
            "(0 publishes every one)"
        },
    )
    anchor_weight: float = field(
        default=1.0,
        metadata={
            "help": "fine-tuning: weight of the KL to the base model's own answers on shipped "
            "general prompts (keeps general answers, costs time in every step; 0: off)"
        },
    )
    fallback_to_base: bool = field(
        default=False,
        metadata={"help": "a user without an adapter gets the base model instead of 404"},
    )
    admin_token: str = field(
        default="",
        metadata={"help": "admin bearer token (env VERA_ADMIN_TOKEN); empty = dev mode, no auth"},
    )
    compile: str = field(
        default="auto",
        metadata={
            "help": "torch.compile the decode step: auto (CUDA: before serving, in CUDA graphs; "
            "CPU in bf16: in the background while serving eagerly; CPU in fp32: off, not faster), "
            "background (CPU), on (before serving) or off"
        },
    )
    packed_weights: bool = field(
        default=True,
        metadata={
            "help": "CPU, fp32: decode steps multiply with weights prepacked for oneDNN "
            "(faster; one more copy of the linear weights in host memory)"
        },
    )
    log_level: str = field(default="info", metadata={"help": "debug, info or warning"})

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"--dtype must be auto or one of {sorted(_DTYPES)}")
        for name in (
            "max_batch",
            "max_prefill_tokens",
            "idle_prefill_tokens",
            "max_waiting",
            "max_waiting_per_user",
            "max_seq_len",
            "device_slots",
            "host_slots",
            "r",
            "max_jobs",
            "max_training_examples",
            "max_training_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.prefix_cache_mb < 0:
            raise ValueError("--prefix-cache-mb must be >= 0")
        if self.share_prefix_tokens < 0:
            raise ValueError("--share-prefix-tokens must be >= 0 (0: identical prompts only)")
        if not 0 < self.train_share <= 1:
            raise ValueError("--train-share must be in (0, 1]")
        for name in ("user_requests_per_minute", "user_tokens_per_minute", "user_max_concurrent"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 = unlimited)")
        if self.scheduling not in POLICIES:
            raise ValueError(f"--scheduling must be one of {', '.join(POLICIES)}")
        if self.fair_input_weight < 0 or self.fair_output_weight <= 0:
            raise ValueError("--fair-input-weight must be >= 0 and --fair-output-weight > 0")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"--compile must be one of {', '.join(COMPILE_MODES)}")
        if not 0 <= self.min_retention <= 1:
            raise ValueError("--min-retention must be in [0, 1]")
        if self.anchor_weight < 0:
            raise ValueError("--anchor-weight must be >= 0 (0: off)")
        if self.max_training_file_mb <= 0:
            raise ValueError("--max-training-file-mb must be > 0")
        if not self.admin_token and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(
                "refusing to bind a non-loopback address without VERA_ADMIN_TOKEN "
                "(dev mode has no auth)"
            )

    @property
    def dev_mode(self) -> bool:
        return not self.admin_token

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """auto: bfloat16 on CUDA and on CPUs with native bf16 math (AMX or AVX512-BF16),
        float32 elsewhere (bf16 emulated in software is slower than fp32)."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.torch_device.type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32

    @property
    def compile_mode(self) -> str:
        """The engine's compile mode ("off", "startup", "background"; see
        server/engine/compile.py, measured by bench/bench_compile.py). auto: CUDA at startup
        (CUDA graphs); CPU in bf16 in the background (compiled bf16 decode measured 1.27-1.48x
        eager); CPU in fp32 off (compiled fp32 measured 0.87-0.94x eager). The background
        compile is CPU-only: on CUDA it means at startup."""
        cuda = self.torch_device.type == "cuda"
        if self.compile == "auto":
            if cuda:
                return "startup"
            return "background" if self.torch_dtype == torch.bfloat16 else "off"
        if self.compile == "background":
            return "startup" if cuda else "background"
        return {"on": "startup", "off": "off"}[self.compile]

    @property
    def store_location(self) -> str:
        """A database URL as given, or the store directory (expanded)."""
        if is_database_url(self.store):
            return self.store
        if self.store:
            return str(Path(self.store).expanduser())
        return str(vera_home() / "store")

    @property
    def targets(self) -> tuple[str, ...]:
        return parse_targets(self.target_modules)

    @property
    def max_training_file_bytes(self) -> int:
        return int(self.max_training_file_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def vera_home() -> Path:
    """Where the server keeps what it makes: the converted default model and the default
    store (``$VERA_HOME``, else ``~/.cache/vera-serve``)."""
    return Path(os.environ.get("VERA_HOME", Path.home() / ".cache" / "vera-serve")).expanduser()


def cpu_has_native_bf16() -> bool:
    """The CPU computes in bfloat16 natively (``amx_bf16`` or ``avx512_bf16`` in its flags)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "").split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _env_default(f: Any) -> Any:
    raw = os.environ.get(f"VERA_{f.name.upper()}")
    default: Any = f.default if f.default is not MISSING else None
    if raw is None or default is None:
        return default
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    return type(default)(raw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; each defaults to its ``VERA_<NAME>`` env var, then the field default."""
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = _env_default(f)
        if isinstance(f.default, bool):
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f.metadata.get("help"),
            )
        elif f.name == "admin_token":
            continue  # a secret: env only, never on the command line
        else:
            parser.add_argument(
                flag,
                type=type(f.default),
                default=default,
                help=f"{f.metadata.get('help')} (env VERA_{f.name.upper()})",
            )


def from_args(args: argparse.Namespace) -> ServerConfig:
    values = {f.name: getattr(args, f.name) for f in fields(ServerConfig) if hasattr(args, f.name)}
    values["admin_token"] = os.environ.get("VERA_ADMIN_TOKEN", "")
    return ServerConfig(**values)
