"""Bad adapters and bad targets fail with typed errors that say what is wrong."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import pytest
import torch
from peft_oracle import random_adapter
from safetensors.torch import save as st_save

from vera_core import (
    Adapter,
    AdapterFormatError,
    AdapterHeader,
    AdapterMismatchError,
    AdapterValueError,
    TargetModuleError,
    VeraConfig,
    VeraModel,
    inject_vera,
    model_fingerprint,
)
from vera_core.adapter_file import adapter_from_bytes, adapter_to_bytes
from vera_core.peft_compat import adapter_from_peft, load_peft_dir, save_peft_dir

R = 8


@pytest.fixture
def vm(make_tiny) -> VeraModel:
    return inject_vera(make_tiny("llama"), VeraConfig(r=R, target_modules=("q_proj", "v_proj")))


@pytest.fixture
def good(vm) -> Adapter:
    adapter = random_adapter(vm, seed=0)
    header = AdapterHeader(R, 0, ("q_proj", "v_proj"), model_fingerprint(vm.model))
    return Adapter(header, adapter.vectors)


def _edit(adapter: Adapter, fn: Callable[[str, torch.Tensor, torch.Tensor], tuple]) -> Adapter:
    return Adapter(adapter.header, {n: fn(n, d, b) for n, (d, b) in adapter.vectors.items()})


def _reload_and_fit(vm: VeraModel, adapter: Adapter) -> None:
    """What the server does with an upload: parse, check values, check it fits."""
    parsed = adapter_from_bytes(adapter_to_bytes(adapter))
    parsed.check_fits(vm.layout, vm.config.projection_prng_key, model_fingerprint(vm.model))


def test_good_adapter_passes(vm, good):
    _reload_and_fit(vm, good)


def test_wrong_shape_of_b(vm, good):
    bad = _edit(good, lambda n, d, b: (d, b[:-1]))
    with pytest.raises(AdapterMismatchError, match=r"vera_lambda_b has shape"):
        _reload_and_fit(vm, bad)


def test_wrong_shape_of_d(vm, good):
    bad = _edit(good, lambda n, d, b: (d.reshape(2, -1), b))
    with pytest.raises(AdapterMismatchError, match=r"vera_lambda_d has shape"):
        _reload_and_fit(vm, bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf(vm, good, value):
    def poison(n, d, b):
        b = b.clone()
        b[3] = value
        return d, b

    with pytest.raises(AdapterValueError, match="NaN or Inf"):
        _reload_and_fit(vm, _edit(good, poison))


def test_absurd_magnitude(vm, good):
    bad = _edit(good, lambda n, d, b: (d * 1e7, b))
    with pytest.raises(AdapterValueError, match="not a trained adapter"):
        _reload_and_fit(vm, bad)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64])
def test_unsupported_dtype(vm, good, dtype):
    bad = _edit(good, lambda n, d, b: (d.to(dtype), b))
    with pytest.raises(AdapterValueError, match="dtype"):
        _reload_and_fit(vm, bad)


def test_half_precision_is_accepted(vm, good):
    _reload_and_fit(vm, _edit(good, lambda n, d, b: (d.bfloat16(), b.half())))


def test_wrong_r(vm, good):
    header = AdapterHeader(R * 2, 0, good.header.target_modules, good.header.base_fingerprint)
    bad = Adapter(header, {n: (torch.cat([d, d]), b) for n, (d, b) in good.vectors.items()})
    with pytest.raises(AdapterMismatchError, match=f"r={2 * R}"):
        _reload_and_fit(vm, bad)


def test_wrong_key(vm, good):
    header = AdapterHeader(R, 5, good.header.target_modules, good.header.base_fingerprint)
    with pytest.raises(AdapterMismatchError, match="projection_prng_key=5"):
        _reload_and_fit(vm, Adapter(header, good.vectors))


def test_missing_layers(vm, good):
    vectors = dict(good.vectors)
    del vectors["model.layers.1.self_attn.v_proj"]
    with pytest.raises(
        AdapterMismatchError, match=r"missing \['model.layers.1.self_attn.v_proj'\]"
    ):
        _reload_and_fit(vm, Adapter(good.header, vectors))


def test_extra_layers(vm, good):
    d, _ = good.vectors["model.layers.0.self_attn.q_proj"]
    vectors = dict(good.vectors)
    vectors["model.layers.0.self_attn.k_proj"] = (d.clone(), torch.zeros(32))
    with pytest.raises(
        AdapterMismatchError, match=r"unexpected \['model.layers.0.self_attn.k_proj'\]"
    ):
        _reload_and_fit(vm, Adapter(good.header, vectors))


def test_wrong_base_fingerprint(vm, good, make_tiny):
    other = model_fingerprint(make_tiny("llama", seed=1))
    assert other != model_fingerprint(vm.model)
    header = AdapterHeader(R, 0, good.header.target_modules, other)
    with pytest.raises(AdapterMismatchError, match="base model"):
        _reload_and_fit(vm, Adapter(header, good.vectors))


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1])
def test_truncated_bytes(good, keep):
    data = adapter_to_bytes(good)
    with pytest.raises(AdapterFormatError):
        adapter_from_bytes(data[:keep] if keep >= 0 else data[: len(data) - 7])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 64,
        bytes(range(256)) * 4,
        b"PK\x03\x04 this is a zip, not safetensors",
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
        struct.pack("<Q", 2**62) + b"{}",
    ],
    ids=["empty", "zeros", "bytes", "zip", "json-list", "not-utf8", "huge-length"],
)
def test_garbage_bytes(data):
    with pytest.raises(AdapterFormatError):
        adapter_from_bytes(data)


def _rewrite_header(data: bytes, edit: Callable[[dict], None]) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize(
    "lie",
    [
        lambda h: h[_first_tensor(h)].update(data_offsets=[0, 10**9]),
        lambda h: h[_first_tensor(h)].update(data_offsets=[8, 4]),
        lambda h: h[_first_tensor(h)].update(shape=[10**6]),
        lambda h: h[_first_tensor(h)].update(dtype="F99"),
    ],
    ids=["past-end", "backwards", "shape-vs-bytes", "bad-dtype"],
)
def test_header_lying_about_offsets(good, lie):
    with pytest.raises(AdapterFormatError):
        adapter_from_bytes(_rewrite_header(adapter_to_bytes(good), lie))


def test_missing_metadata(good):
    tensors = {f"{n}.vera_lambda_d": d for n, (d, _) in good.vectors.items()}
    tensors |= {f"{n}.vera_lambda_b": b for n, (_, b) in good.vectors.items()}
    with pytest.raises(AdapterFormatError, match="not a vera-serve-adapter"):
        adapter_from_bytes(st_save(tensors))


@pytest.mark.parametrize("field", ["r", "projection_prng_key", "format_version"])
def test_missing_metadata_field(good, field):
    data = _rewrite_header(adapter_to_bytes(good), lambda h: h["__metadata__"].pop(field))
    with pytest.raises(AdapterFormatError, match=field):
        adapter_from_bytes(data)


def test_non_integer_metadata(good):
    data = _rewrite_header(adapter_to_bytes(good), lambda h: h["__metadata__"].update(r="eight"))
    with pytest.raises(AdapterFormatError, match="not an integer"):
        adapter_from_bytes(data)


def _resave(good: Adapter, edit: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    """``good``'s file with its tensors edited and its metadata kept."""
    data = adapter_to_bytes(good)
    n = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + n])["__metadata__"]
    tensors = {f"{k}.vera_lambda_d": d for k, (d, _) in good.vectors.items()}
    tensors |= {f"{k}.vera_lambda_b": b for k, (_, b) in good.vectors.items()}
    edit(tensors)
    return st_save(tensors, metadata=metadata)


def test_unexpected_tensor(good):
    data = _resave(good, lambda t: t.update({"lm_head.weight": torch.zeros(4, 4)}))
    with pytest.raises(AdapterFormatError, match="unexpected tensor 'lm_head.weight'"):
        adapter_from_bytes(data)


def test_d_without_b(good):
    data = _resave(good, lambda t: t.pop("model.layers.0.self_attn.q_proj.vera_lambda_b"))
    with pytest.raises(AdapterFormatError, match="only one of"):
        adapter_from_bytes(data)


def test_no_tensors(good):
    data = _resave(good, lambda t: t.clear())
    with pytest.raises(AdapterFormatError, match="no vera_lambda"):
        adapter_from_bytes(data)


def test_peft_config_of_another_peft_type(vm, tmp_path):
    cfg = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]}
    with pytest.raises(AdapterMismatchError, match="peft_type='LORA'"):
        adapter_from_peft(json.dumps(cfg).encode(), b"", vm.projections)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_peft_config_not_json(vm, raw):
    with pytest.raises(AdapterFormatError):
        adapter_from_peft(raw, b"", vm.projections)


@pytest.mark.parametrize(
    "targets, words",
    [
        (["q_proj", "k_proj", "v_proj"], ["'k_proj'", "targets with no vectors"]),
        (["q_proj"], ["v_proj", "vectors but no target"]),
        (r".*\.q_proj", ["v_proj", "vectors but no target"]),
    ],
)
def test_peft_targets_disagreeing_with_tensors(vm, good, tmp_path, targets, words):
    """PEFT builds its model from target_modules: a config that disagrees with the tensors
    it carries would load as another model there, so it is refused naming both sides."""
    save_peft_dir(good, vm, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["target_modules"] = targets
    weights = (tmp_path / "adapter_model.safetensors").read_bytes()
    with pytest.raises(AdapterMismatchError) as info:
        adapter_from_peft(json.dumps(cfg).encode(), weights, vm.projections)
    message = str(info.value)
    assert "target_modules" in message and "['q_proj', 'v_proj']" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "targets", [["q_proj", "v_proj"], ["self_attn.q_proj", "v_proj"], "all-linear"]
)
def test_peft_targets_agreeing_with_tensors(vm, good, tmp_path, targets):
    save_peft_dir(good, vm, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["target_modules"] = targets
    weights = (tmp_path / "adapter_model.safetensors").read_bytes()
    adapter = adapter_from_peft(json.dumps(cfg).encode(), weights, vm.projections)
    assert sorted(adapter.vectors) == sorted(good.vectors)


def test_peft_dir_missing_files(vm, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA"}))
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors"):
        load_peft_dir(tmp_path, vm.projections)


def test_unknown_target_module_names_what_exists(make_tiny):
    with pytest.raises(TargetModuleError) as info:
        inject_vera(make_tiny("llama"), VeraConfig(r=R, target_modules=("q_proj", "qq_proj")))
    message = str(info.value)
    assert "qq_proj" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message


def test_non_linear_target_is_rejected(make_tiny):
    with pytest.raises(TargetModuleError, match="c_attn"):
        inject_vera(make_tiny("gpt2"), VeraConfig(r=R, target_modules=("attn",)))


def test_regex_matching_nothing(make_tiny):
    with pytest.raises(TargetModuleError, match="available"):
        inject_vera(make_tiny("llama"), VeraConfig(r=R, target_modules=(r".*\.nothing_here",)))


def test_no_default_targets_for_unknown_model_type(make_tiny):
    model = make_tiny("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="mystery"):
        inject_vera(model, VeraConfig(r=R))


def test_target_modules_parse_alike_everywhere() -> None:
    """``--target-modules`` of ``serve`` and ``train``: names with spaces, all-linear, a regex."""
    from vera_core.config import parse_targets

    assert parse_targets(" q_proj, v_proj ,") == ("q_proj", "v_proj")
    assert parse_targets("") == ()
    assert parse_targets("all-linear") == ("all-linear",)
    assert parse_targets(r"model\.layers\.{0,1}\.self_attn\.(q|v)_proj") == (
        r"model\.layers\.{0,1}\.self_attn\.(q|v)_proj",  # a regex may hold a comma
    )
