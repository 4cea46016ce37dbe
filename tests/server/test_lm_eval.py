"""lm-evaluation-harness scores a served model: its ``local-completions`` model (token-id
prompts, ``echo``, ``logprobs: 1``, ``max_tokens: 1`` to /v1/completions, several prompts per
request) gives the same per-choice loglikelihoods (fp32, within 1e-3) and the same answers as
its own ``hf`` model on the same weights, for the base model and for a user's adapter
(``hf`` with ``peft=``)."""

from __future__ import annotations

import pytest
from tiny_server import Tiny

from vera_core import VeraConfig, inject_vera
from vera_core.peft_compat import save_peft_dir

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402

# a tiny multiple-choice task: (question, choices)
TASK = [
    ("The capital of France is", [" Paris", " Rome", " Berlin"]),
    ("Two plus two equals", [" four", " five", " twenty-two"]),
    ("The sky on a clear day is", [" blue", " green"]),
    ("Water freezes at zero degrees", [" Celsius", " Fahrenheit", " Kelvin", " never"]),
]
TOL = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    server = Tiny(tmp_path_factory.mktemp("lm-eval"))
    yield server
    server.live.stop()


def requests() -> list[Instance]:
    pairs = [(q, c) for q, choices in TASK for c in choices]
    return [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
        for i, pair in enumerate(pairs)
    ]


def answers(scores: list[tuple[float, bool]]) -> list[int]:
    """The chosen choice of each question (highest loglikelihood)."""
    out, at = [], 0
    for _, choices in TASK:
        lls = [ll for ll, _ in scores[at : at + len(choices)]]
        out.append(max(range(len(lls)), key=lls.__getitem__))
        at += len(choices)
    return out


@pytest.mark.parametrize("user", [None, "eve"])
def test_local_completions_equal_hf_loglikelihoods(tiny: Tiny, tmp_path, monkeypatch, user):
    monkeypatch.setenv("OPENAI_API_KEY", tiny.key)
    served = LocalCompletionsAPI(
        base_url=f"{tiny.live.url}/v1/completions",
        model=user or tiny.name,
        tokenizer=str(tiny.dir),
        tokenizer_backend="huggingface",
        batch_size=4,  # four prompts per request, one choice each
        max_length=256,
        max_retries=1,
    )
    peft = None
    if user is not None:
        vm = inject_vera(tiny.fresh_model(), VeraConfig(r=tiny.r), num_slots=2)
        peft = str(tmp_path / "peft")
        save_peft_dir(tiny.adapter, vm, tmp_path / "peft")
    local = HFLM(pretrained=str(tiny.dir), peft=peft, dtype="float32", device="cpu", batch_size=4)
    got = served.loglikelihood(requests())
    want = local.loglikelihood(requests())
    assert len(got) == len(want) == sum(len(c) for _, c in TASK)
    for (ll, greedy), (ll_hf, greedy_hf) in zip(got, want):
        assert abs(ll - ll_hf) < TOL, (ll, ll_hf)
        assert greedy == greedy_hf
    assert answers(got) == answers(want)
    if user is not None:  # the adapter is really in both (its scores are not the base's)
        base = HFLM(pretrained=str(tiny.dir), dtype="float32", device="cpu", batch_size=4)
        moved = [abs(a - b) for (a, _), (b, _) in zip(got, base.loglikelihood(requests()))]
        assert max(moved) > 0.1, moved
