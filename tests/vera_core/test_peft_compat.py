"""PEFT directories in and out: PEFT's greedy tokens with our batched path, and the reverse."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from peft_oracle import ours_and_peft, random_adapter, set_peft_vectors

from vera_core import AdapterMismatchError, VeraConfig, VeraModel
from vera_core.peft_compat import CONFIG_NAME, load_peft_dir, save_peft_dir

# PEFT warns that save_projection=False relies on the PRNG: exactly what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore:Specified to not:UserWarning")

NEW_TOKENS = 8
PROMPT_LENGTHS = [3, 7, 5, 9]


def _prompts(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return [torch.randint(3, vocab, (n,), generator=g) for n in PROMPT_LENGTHS]


def _left_pad(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def _generate_one(model, prompt: torch.Tensor) -> list[int]:
    out = model.generate(
        input_ids=prompt[None], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def _generate_batched(vm: VeraModel, prompts, slots: list[int]) -> list[list[int]]:
    ids, mask = _left_pad(prompts, pad=0)
    with vm.slots(torch.tensor(slots)):
        out = vm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].tolist()


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_saved_adapters_reproduce_peft_tokens(make_tiny, tmp_path, save_projection):
    base = make_tiny("llama")
    config = VeraConfig(r=16, target_modules=("q_proj", "v_proj"))
    vm, peft_model = ours_and_peft(base, config, num_slots=5, save_projection=save_projection)
    prompts = _prompts(base.config.vocab_size)
    expected = []
    for user in range(len(prompts)):
        trained = random_adapter(vm, seed=user, scale=1.0)
        set_peft_vectors(peft_model, trained)
        peft_model.save_pretrained(tmp_path / f"user{user}")
        expected.append(_generate_one(peft_model, prompts[user]))
        imported = load_peft_dir(tmp_path / f"user{user}", vm.projections)
        imported.check_fits(vm.layout, config.projection_prng_key)
        for name, (d, b) in trained.vectors.items():
            assert torch.equal(imported.vectors[name][0], d)
            assert torch.equal(imported.vectors[name][1], b)
        vm.bank.load(user + 1, imported.flat(vm.layout))
    assert len({tuple(t) for t in expected}) > 1, "users should generate different text"
    assert _generate_batched(vm, prompts, [1, 2, 3, 4]) == expected


@pytest.mark.parametrize("save_projection", [True, False])
def test_our_export_loads_in_peft_and_reproduces_our_tokens(make_tiny, tmp_path, save_projection):
    base = make_tiny("llama")
    config = VeraConfig(r=16, projection_prng_key=3, target_modules=("q_proj", "v_proj"))
    vm, _ = ours_and_peft(base, config, num_slots=5)
    prompts = _prompts(base.config.vocab_size)
    users = [random_adapter(vm, seed=10 + i, scale=1.0) for i in range(len(prompts))]
    for slot, user in enumerate(users, start=1):
        vm.bank.load(slot, user.flat(vm.layout))
    ours = _generate_batched(vm, prompts, [1, 2, 3, 4])
    assert ours != _generate_batched(vm, prompts, [0, 0, 0, 0])
    for i, user in enumerate(users):
        out_dir = tmp_path / f"export{i}"
        save_peft_dir(user, vm, out_dir, save_projection=save_projection)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), out_dir).eval()
        assert _generate_one(peft_model, prompts[i]) == ours[i]


def _save_peft(base, tmp_path, name: str, config: VeraConfig, save_projection: bool = True):
    vm, peft_model = ours_and_peft(base, config, num_slots=2, save_projection=save_projection)
    set_peft_vectors(peft_model, random_adapter(vm, seed=1))
    peft_model.save_pretrained(tmp_path / name)
    return tmp_path / name


def _server(base) -> VeraModel:
    vm, _ = ours_and_peft(base, VeraConfig(r=16, target_modules=("q_proj", "v_proj")), 2)
    return vm


def test_saved_projections_of_another_key_are_rejected(make_tiny, tmp_path):
    base = make_tiny("llama")
    vm = _server(base)
    other = VeraConfig(r=16, projection_prng_key=1, target_modules=("q_proj", "v_proj"))
    path = _save_peft(base, tmp_path, "other_key", other)
    with pytest.raises(AdapterMismatchError, match="vera_A"):
        load_peft_dir(path, vm.projections)


def test_saved_projections_differing_under_the_same_key_are_rejected(make_tiny, tmp_path):
    base = make_tiny("llama")
    vm = _server(base)
    other = VeraConfig(r=16, projection_prng_key=1, target_modules=("q_proj", "v_proj"))
    path = _save_peft(base, tmp_path, "lying", other)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg["projection_prng_key"] = 0  # claims our key, but its saved A/B come from key 1
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(AdapterMismatchError, match="differs from this server"):
        load_peft_dir(path, vm.projections)


def test_other_key_without_saved_projections_fails_check_fits(make_tiny, tmp_path):
    base = make_tiny("llama")
    vm = _server(base)
    other = VeraConfig(r=16, projection_prng_key=1, target_modules=("q_proj", "v_proj"))
    path = _save_peft(base, tmp_path, "no_proj", other, save_projection=False)
    adapter = load_peft_dir(path, vm.projections)
    with pytest.raises(AdapterMismatchError, match="projection_prng_key=1"):
        adapter.check_fits(vm.layout, vm.config.projection_prng_key)


def test_saved_projections_of_another_r_are_rejected(make_tiny, tmp_path):
    base = make_tiny("llama")
    vm = _server(base)
    path = _save_peft(base, tmp_path, "r8", VeraConfig(r=8, target_modules=("q_proj", "v_proj")))
    with pytest.raises(AdapterMismatchError, match="shape"):
        load_peft_dir(path, vm.projections)
