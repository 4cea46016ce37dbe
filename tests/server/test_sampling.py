"""Sampling and stop strings."""

from __future__ import annotations

import torch

from server.engine.detokenizer import StopChecker
from server.engine.sampler import sample
from server.engine.sampling_params import SamplingParams


def test_greedy_and_top_k_one_are_argmax() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    want = logits.argmax(-1).tolist()
    assert sample(logits, [SamplingParams()] * 5, [None] * 5) == want
    p = SamplingParams(temperature=1.5, top_k=1)
    assert sample(logits, [p] * 5, [None] * 5) == want


def test_seed_makes_sampling_reproducible() -> None:
    logits = torch.zeros(1, 1000)
    p = SamplingParams(temperature=1.0, seed=3)
    runs = [
        [sample(logits, [p], [g])[0] for _ in range(20)]
        for g in (torch.Generator().manual_seed(3), torch.Generator().manual_seed(3))
    ]
    assert runs[0] == runs[1] and len(set(runs[0])) > 5


def test_top_p_and_top_k_stay_inside_their_sets() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    top_p = {
        sample(logits, [SamplingParams(temperature=1, top_p=0.75)], [g])[0] for _ in range(300)
    }
    assert top_p == {0, 1}  # 0.5 + 0.3 covers 0.75
    top_k = {sample(logits, [SamplingParams(temperature=1, top_k=3)], [g])[0] for _ in range(300)}
    assert top_k == {0, 1, 2}


def test_one_batch_mixes_greedy_sampled_and_seeded_rows() -> None:
    """Each row follows its own parameters; a seeded row gives the same tokens whatever else
    shares its batch."""
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    params = [
        SamplingParams(),
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=0.7, seed=11),
        SamplingParams(temperature=1.0, top_p=0.5),
    ]
    top2 = set(logits[1].topk(2).indices.tolist())
    seeded_alone, seeded_in_batch = [], []
    g_alone, g_batch = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(50):
        out = sample(logits, params, [None, None, g_batch, None])
        assert out[0] == int(logits[0].argmax()) and out[1] in top2
        seeded_in_batch.append(out[2])
        seeded_alone.append(sample(logits[2:3], [params[2]], [g_alone])[0])
    assert seeded_alone == seeded_in_batch and len(set(seeded_alone)) > 1


def test_sampled_frequencies_follow_the_tempered_distribution() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    p = SamplingParams(temperature=2.0)
    want = torch.softmax(logits[0] / 2.0, dim=-1)
    g = torch.Generator().manual_seed(5)
    counts = torch.zeros(3)
    n = 4000
    batch = logits.expand(n, 3).contiguous()  # one call, n rows: the batched path itself
    for tok in sample(batch, [p] * n, [None] * n):
        counts[tok] += 1
    del g
    assert torch.allclose(counts / n, want, atol=0.03), (counts / n, want)


class CharTokenizer:
    """Token i decodes to chr(i): enough to exercise incremental detokenization."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def test_stop_string_truncates_and_holds_back_partial_matches() -> None:
    c = StopChecker(CharTokenizer(), ("END",))
    out = []
    ids: list[int] = []
    for ch in "abcEN":
        ids.append(ord(ch))
        out.append(c.update(ids))
    assert "".join(out) == "abc"  # "EN" held back: it may become "END"
    ids.append(ord("D"))
    out.append(c.update(ids))
    assert c.stopped and c.text == "abc" and "".join(out) == "abc"


def test_false_alarm_is_released() -> None:
    c = StopChecker(CharTokenizer(), ("END",))
    ids = [ord(x) for x in "abEN"]
    assert c.update(ids) == "ab"
    ids += [ord("x")]
    assert c.update(ids) == "ENx" and not c.stopped


def test_incremental_decode_equals_full_decode_on_real_tokenizer() -> None:
    from transformers import AutoTokenizer

    from server.model_source import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    text = "Héllo wörld! 😀 naïve café — 日本語のテキスト\n  indented  code()  END tail"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    plain = StopChecker(tok, ())
    out = "".join(plain.update(ids[: i + 1]) for i in range(len(ids))) + plain.flush()
    assert out == tok.decode(ids, skip_special_tokens=True)
    stopping = StopChecker(tok, ("END",))
    streamed = "".join(stopping.update(ids[: i + 1]) for i in range(len(ids)))
    assert stopping.stopped and streamed + stopping.flush() == text[: text.index("END")]
