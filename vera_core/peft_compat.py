"""Read and write Hugging Face PEFT VeRA adapter directories.

PEFT saves ``adapter_config.json`` (peft_type "VERA", r, projection_prng_key, save_projection,
target_modules, ...) and ``adapter_model.safetensors`` with keys
``base_model.model.<layer>.vera_lambda_{d,b}`` and, with save_projection, ``base_model.vera_A``
[r, max_in] and ``base_model.vera_B`` [max_out, r].
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vera_core.adapter import Adapter, AdapterHeader
from vera_core.adapter_file import load_tensors, split_vectors
from vera_core.errors import AdapterFormatError, AdapterMismatchError
from vera_core.inject import VeraModel
from vera_core.projections import Projections

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY_A, _KEY_B = "base_model.vera_A", "base_model.vera_B"


def parse_peft_config(raw: bytes) -> dict[str, Any]:
    try:
        cfg = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{CONFIG_NAME} is not a JSON object")
    if str(cfg.get("peft_type", "")).upper() != "VERA":
        raise AdapterMismatchError(
            f"{CONFIG_NAME} has peft_type={cfg.get('peft_type')!r}; only VERA adapters are served"
        )
    for key in ("r", "projection_prng_key"):
        if not isinstance(cfg.get(key), int):
            raise AdapterFormatError(f"{CONFIG_NAME} lacks an integer {key!r}")
    return cfg


def _check_projection(name: str, saved: torch.Tensor, ours: torch.Tensor) -> None:
    if tuple(saved.shape) != tuple(ours.shape):
        raise AdapterMismatchError(
            f"saved {name} has shape {tuple(saved.shape)}, this server's is {tuple(ours.shape)}"
        )
    if not torch.equal(saved, ours.to(saved.dtype)):
        raise AdapterMismatchError(
            f"saved {name} differs from this server's shared projection (other seed or model)"
        )


def adapter_from_peft(
    config_bytes: bytes, weights_bytes: bytes, projections: Projections | None = None
) -> Adapter:
    """Build an Adapter from the two files of a PEFT directory; check saved A/B against ours."""
    cfg = parse_peft_config(config_bytes)
    tensors = load_tensors(weights_bytes)
    saved_a, saved_b = tensors.pop(_KEY_A, None), tensors.pop(_KEY_B, None)
    if projections is not None:
        ours = projections.to("cpu", torch.float32)
        if saved_a is not None:
            _check_projection("vera_A", saved_a, ours.A)
        if saved_b is not None:
            _check_projection("vera_B", saved_b, ours.B)
    targets = cfg.get("target_modules") or ()
    header = AdapterHeader(
        r=cfg["r"],
        projection_prng_key=cfg["projection_prng_key"],
        target_modules=(targets,) if isinstance(targets, str) else tuple(targets),
        base_fingerprint="",
        dtype=str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else "",
    )
    adapter = Adapter(header, split_vectors(tensors, prefix=_PREFIX))
    check_targets(targets, sorted(adapter.vectors))
    adapter.check_values()
    return adapter


def _matches(target: str, layer: str) -> bool:
    """PEFT's rule for a list entry: the module name equals it or ends with ``.<target>``."""
    return layer == target or layer.endswith("." + target)


def check_targets(targets: str | list[str] | tuple[str, ...], layers: list[str]) -> None:
    """Refuse a config whose ``target_modules`` disagree with the layers the tensors adapt.

    PEFT builds its model from ``target_modules``, not from the tensors: a layer with vectors
    but no matching target, or a target with no vectors, would serve something else than
    what PEFT itself loads from the same directory. A string is a regex (``re.fullmatch``);
    ``"all-linear"`` depends on the base model and is left to the layout check.
    """
    if not targets or targets == "all-linear" or not layers:
        return
    if isinstance(targets, str):
        unmatched = [name for name in layers if not re.fullmatch(targets, name)]
        unused: list[str] = []
    else:
        names = [str(t) for t in targets]
        unmatched = [name for name in layers if not any(_matches(t, name) for t in names)]
        unused = [t for t in names if not any(_matches(t, name) for name in layers)]
    if unmatched or unused:
        carried = sorted({name.rsplit(".", 1)[-1] for name in layers})
        raise AdapterMismatchError(
            f"{CONFIG_NAME} target_modules {targets!r} disagree with the tensors, which adapt "
            f"{carried}: "
            + "; ".join(
                part
                for part in (
                    f"layers with vectors but no target: {unmatched[:3]}" if unmatched else "",
                    f"targets with no vectors: {unused}" if unused else "",
                )
                if part
            )
        )


def load_peft_dir(path: str | Path, projections: Projections | None = None) -> Adapter:
    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise AdapterFormatError(f"PEFT adapter directory {path} lacks {name}")
    return adapter_from_peft(
        (path / CONFIG_NAME).read_bytes(), (path / WEIGHTS_NAME).read_bytes(), projections
    )


def save_peft_dir(
    adapter: Adapter,
    vm: VeraModel,
    path: str | Path,
    save_projection: bool = True,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write a directory that ``peft.PeftModel.from_pretrained(base, path)`` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_type = getattr(vm.model.config, "model_type", "")
    config = {
        "peft_type": "VERA",
        "task_type": "CAUSAL_LM",
        "r": vm.config.r,
        "target_modules": list(vm.config.resolved_targets(model_type)),
        "projection_prng_key": vm.config.projection_prng_key,
        "save_projection": save_projection,
        "vera_dropout": 0.0,
        "d_initial": vm.config.d_initial,
        "fan_in_fan_out": model_type == "gpt2",
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path
        or getattr(vm.model.config, "_name_or_path", None),
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, (d, b) in adapter.vectors.items():
        tensors[f"{_PREFIX}{name}.vera_lambda_d"] = d.detach().float().contiguous()
        tensors[f"{_PREFIX}{name}.vera_lambda_b"] = b.detach().float().contiguous()
    if save_projection:
        cpu = vm.projections.to("cpu", torch.float32)
        tensors[_KEY_A], tensors[_KEY_B] = cpu.A.contiguous(), cpu.B.contiguous()
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
