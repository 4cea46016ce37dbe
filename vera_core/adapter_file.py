"""vera-serve's adapter file: safetensors with one d and one b per layer, plus a header.

Tensors: ``<layer name>.vera_lambda_d`` [r] and ``<layer name>.vera_lambda_b`` [out].
Metadata (safetensors ``__metadata__``, all strings): format, format_version, r,
projection_prng_key, target_modules (JSON list), base_fingerprint, dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vera_core.adapter import Adapter, AdapterHeader
from vera_core.errors import AdapterFormatError

FORMAT = "vera-serve-adapter"
FORMAT_VERSION = 1
_SUFFIX_D, _SUFFIX_B = ".vera_lambda_d", ".vera_lambda_b"


def adapter_to_bytes(adapter: Adapter) -> bytes:
    h = adapter.header
    tensors: dict[str, torch.Tensor] = {}
    for name, (d, b) in adapter.vectors.items():
        tensors[name + _SUFFIX_D] = d.detach().contiguous()
        tensors[name + _SUFFIX_B] = b.detach().contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "r": str(h.r),
        "projection_prng_key": str(h.projection_prng_key),
        "target_modules": json.dumps(list(h.target_modules)),
        "base_fingerprint": h.base_fingerprint,
        "dtype": h.dtype,
    }
    return _canonical(st_save(tensors, metadata=metadata))


def _canonical(data: bytes) -> bytes:
    """Rewrite the safetensors header with sorted keys: the same adapter always gives the same
    bytes (and sha256), whatever order the writer emitted the JSON in. Offsets are relative to
    the data section, so only the header changes."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise AdapterFormatError(f"adapter file is {len(data)} bytes: truncated or empty")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise AdapterFormatError(
            f"safetensors header claims {n} bytes but the file has {len(data) - 8} after the "
            "length prefix: truncated or not a safetensors file"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise AdapterFormatError("safetensors header is not a JSON object")
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """safetensors bytes -> tensors, every failure as AdapterFormatError."""
    _read_metadata(data)
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        raise AdapterFormatError(f"invalid safetensors data: {e}") from None


def _int_field(meta: dict[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except KeyError:
        raise AdapterFormatError(f"adapter metadata lacks {key!r}") from None
    except ValueError:
        raise AdapterFormatError(
            f"adapter metadata {key!r}={meta[key]!r} is not an integer"
        ) from None


def split_vectors(
    tensors: dict[str, torch.Tensor], prefix: str = ""
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{prefix}<name>.vera_lambda_{d,b}`` keys -> {name: (d, b)}; other keys are an error."""
    ds: dict[str, torch.Tensor] = {}
    bs: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(prefix):
            raise AdapterFormatError(f"unexpected tensor {key!r} in adapter file")
        name = key[len(prefix) :]
        if name.endswith(_SUFFIX_D):
            ds[name[: -len(_SUFFIX_D)]] = t
        elif name.endswith(_SUFFIX_B):
            bs[name[: -len(_SUFFIX_B)]] = t
        else:
            raise AdapterFormatError(f"unexpected tensor {key!r} in adapter file")
    if set(ds) != set(bs):
        odd = sorted(set(ds) ^ set(bs))
        raise AdapterFormatError(f"layers with only one of vera_lambda_d/vera_lambda_b: {odd[:4]}")
    if not ds:
        raise AdapterFormatError("adapter file holds no vera_lambda_d/vera_lambda_b tensors")
    return {name: (ds[name], bs[name]) for name in ds}


def adapter_from_bytes(data: bytes) -> Adapter:
    """Parse and sanity-check an adapter file; fitting this server is ``Adapter.check_fits``."""
    meta = _read_metadata(data)
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(
            f"not a {FORMAT} file (metadata format={meta.get('format')!r}); "
            "PEFT adapters are uploaded as a zip of their directory"
        )
    version = _int_field(meta, "format_version")
    if version > FORMAT_VERSION:
        raise AdapterFormatError(f"adapter format_version {version} is newer than {FORMAT_VERSION}")
    try:
        targets = tuple(json.loads(meta.get("target_modules", "[]")))
    except json.JSONDecodeError:
        raise AdapterFormatError("adapter metadata target_modules is not a JSON list") from None
    header = AdapterHeader(
        r=_int_field(meta, "r"),
        projection_prng_key=_int_field(meta, "projection_prng_key"),
        target_modules=targets,
        base_fingerprint=meta.get("base_fingerprint", ""),
        dtype=meta.get("dtype", "float32"),
    )
    adapter = Adapter(header, split_vectors(load_tensors(data)))
    adapter.check_values()
    return adapter


def save_adapter(adapter: Adapter, path: str | Path) -> None:
    Path(path).write_bytes(adapter_to_bytes(adapter))


def load_adapter(path: str | Path) -> Adapter:
    return adapter_from_bytes(Path(path).read_bytes())
