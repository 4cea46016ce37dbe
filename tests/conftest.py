"""Shared fixtures: tiny random models for unit tests, the real default model for end-to-end."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

# pytest puts tests/ on sys.path for this file, where tests/vera_core would shadow the real
# vera_core package as a namespace package; the repo root must come first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_VOCAB = 128


def tiny_llama_config() -> LlamaConfig:
    # GQA (2 kv heads) so q_proj and v_proj have different out_features: exercises A/B slicing.
    return LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_gpt2_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=TINY_VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _build(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(tiny_llama_config())
    elif kind == "gpt2":
        model = GPT2LMHeadModel(tiny_gpt2_config())
    else:
        raise ValueError(kind)
    model.eval().requires_grad_(False)
    return model


@pytest.fixture
def make_tiny() -> Callable[..., torch.nn.Module]:
    """``make_tiny("llama" | "gpt2", seed=0)``: a fresh fp32 random model, identical per seed."""
    return _build


@pytest.fixture(scope="session")
def default_model_files():
    """(model, tokenizer, path) of the real default model; skipped if it is not installed."""
    from server.model_source import ModelSourceError, load_model

    try:
        return load_model()
    except ModelSourceError as e:
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster (``tests/pg_server.PgServer``) for the whole session.

    Skipped when no PostgreSQL server binaries are installed, except on CI (``CI`` set), where
    the tests must really run: there it fails.
    """
    from pg_server import PgServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        reason = "PostgreSQL server binaries (initdb) not found; apt-get install postgresql"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    server = PgServer(bindir)
    yield server
    server.close()
