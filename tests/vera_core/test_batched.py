"""Many users in one batch: each row equals PEFT with that row's adapter alone, and the merge."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_oracle import (
    TEST_DTYPE,
    dtype_tolerance,
    load_users,
    logits_of,
    on_test_device,
    ours_and_peft,
    set_peft_vectors,
)

from vera_core import NO_ADAPTER, VeraConfig, VeraModel
from vera_core.forward import Forward
from vera_core.merge import merge, unmerge

NUM_USERS = 8
# 8 distinct users, no-adapter rows among them, and one user on two rows.
ROW_SLOTS = torch.tensor([1, 2, 0, 3, 4, 5, 0, 6, 7, 8, 3])


def _ids(vocab: int, rows: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (rows, seq), generator=g)


@torch.no_grad()
def _peft_rows(peft_model, users, ids, slots) -> torch.Tensor:
    """PEFT logits of each row with that row's single adapter active (slot 0: b = 0)."""
    out = torch.empty(*ids.shape, peft_model.config.vocab_size)
    for slot in slots.unique().tolist():
        rows = (slots == slot).nonzero().flatten()
        set_peft_vectors(peft_model, users.get(slot))
        out[rows] = logits_of(peft_model, ids[rows])
    return out


@torch.no_grad()
def _merged_rows(vm: VeraModel, users, ids, slots) -> torch.Tensor:
    """Each row through the plain model with its user merged into the weights."""
    out = torch.empty(*ids.shape, vm.model.config.vocab_size)
    for slot in slots.unique().tolist():
        rows = (slots == slot).nonzero().flatten()
        if slot != NO_ADAPTER:
            merge(vm, users[slot])
        try:
            out[rows] = logits_of(vm.model, ids[rows])
        finally:
            unmerge(vm)
    return out


@torch.no_grad()
def _batched(vm: VeraModel, ids, slots, share_projection: bool = True) -> torch.Tensor:
    with vm.run(Forward(slots=slots, share_projection=share_projection)):
        return logits_of(vm.model, ids)


def _check_mixed_batch(base, config, ids, atol=1e-5):
    """On the test device and dtype (peft_oracle.TEST_DEVICE, TEST_DTYPE)."""
    atol = dtype_tolerance(base, ids, atol)
    vm, peft_model = ours_and_peft(on_test_device(base), config, num_slots=NUM_USERS + 2)
    users = load_users(vm, NUM_USERS)
    ours = _batched(vm, ids, ROW_SLOTS)
    expected = _peft_rows(peft_model, users, ids, ROW_SLOTS)
    torch.testing.assert_close(ours, expected, atol=atol, rtol=0)
    merged = _merged_rows(vm, users, ids, ROW_SLOTS)
    torch.testing.assert_close(ours, merged, atol=atol, rtol=0)
    # Sanity: the adapters really change the output, and differ from each other.
    plain = logits_of(vm.model, ids)
    adapted = ROW_SLOTS != NO_ADAPTER
    assert torch.equal(ours[~adapted], plain[~adapted])
    assert (ours[adapted] - plain[adapted]).abs().amax() > 1e-2
    assert (ours[0] - ours[1]).abs().amax() > 1e-2 or not torch.equal(ids[0], ids[1])
    return vm, ours


TINY_CASES = [
    ("llama", VeraConfig(r=16, target_modules=("q_proj", "v_proj"))),
    ("llama", VeraConfig(r=8, projection_prng_key=5, target_modules="all-linear")),
    ("gpt2", VeraConfig(r=16, target_modules=("c_attn",))),
    ("gpt2", VeraConfig(r=8, target_modules="all-linear")),
]


@pytest.mark.parametrize(
    ("kind", "config"), TINY_CASES, ids=[f"{k}-{c.target_modules}" for k, c in TINY_CASES]
)
def test_mixed_batch_matches_peft_and_merge(make_tiny, kind, config):
    base = make_tiny(kind)
    _check_mixed_batch(base, config, _ids(base.config.vocab_size, len(ROW_SLOTS), 10))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_projection_on_off_identical(make_tiny, kind):
    base = make_tiny(kind)
    vm, _ = ours_and_peft(base, VeraConfig(r=8, target_modules="all-linear"), NUM_USERS + 2)
    load_users(vm, NUM_USERS)
    ids = _ids(base.config.vocab_size, len(ROW_SLOTS), 7)
    shared = _batched(vm, ids, ROW_SLOTS)
    assert torch.equal(_batched(vm, ids, ROW_SLOTS, share_projection=False), shared)


def test_per_token_slots_equal_per_row_slots(make_tiny):
    base = make_tiny("llama")
    vm, _ = ours_and_peft(base, VeraConfig(r=8), NUM_USERS + 2)
    load_users(vm, NUM_USERS)
    ids = _ids(base.config.vocab_size, len(ROW_SLOTS), 6)
    per_token = ROW_SLOTS[:, None].expand(-1, ids.shape[1]).contiguous()
    assert torch.equal(_batched(vm, ids, per_token), _batched(vm, ids, ROW_SLOTS))


def test_all_zero_slots_and_none_are_the_base_model(make_tiny):
    base = make_tiny("llama")
    ids = _ids(base.config.vocab_size, 3, 5)
    with torch.no_grad():
        plain = copy.deepcopy(base)(ids).logits
    vm, _ = ours_and_peft(base, VeraConfig(r=8, target_modules="all-linear"), 3)
    load_users(vm, 2)
    assert torch.equal(_batched(vm, ids, None), plain)
    assert torch.equal(_batched(vm, ids, torch.zeros(3, dtype=torch.long)), plain)


def test_slot_swap_is_just_an_index(make_tiny):
    base = make_tiny("gpt2")
    vm, _ = ours_and_peft(base, VeraConfig(r=8), 4)
    load_users(vm, 3)
    ids = _ids(base.config.vocab_size, 1, 6).expand(3, -1)
    rows = _batched(vm, ids, torch.tensor([1, 2, 3]))
    for i, slot in enumerate([1, 2, 3]):
        torch.testing.assert_close(
            _batched(vm, ids[:1], torch.tensor([slot]))[0], rows[i], atol=1e-5, rtol=0
        )


@pytest.mark.slow
def test_mixed_batch_default_model(default_model_files):
    model, _, _ = default_model_files
    config = VeraConfig(r=256, target_modules=("q_proj", "v_proj"))
    ids = _ids(model.config.vocab_size, len(ROW_SLOTS), 6)
    # Logits are ~10-30 here, and GEMMs round differently for different batch shapes: the base
    # model alone moves by this much between the full batch and its per-user row groups.
    noise = _batch_shape_noise(on_test_device(model), ids, ROW_SLOTS)
    assert noise < 1e-3 or TEST_DTYPE is not torch.float32
    _check_mixed_batch(model, config, ids, atol=max(1e-5, 4 * noise))


@torch.no_grad()
def _batch_shape_noise(model, ids, slots) -> float:
    full = logits_of(model, ids)
    worst = 0.0
    for slot in slots.unique().tolist():
        rows = (slots == slot).nonzero().flatten()
        worst = max(worst, (logits_of(model, ids[rows]) - full[rows]).abs().max().item())
    return worst
