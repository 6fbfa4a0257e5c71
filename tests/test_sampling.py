"""Sampling filters, reproducibility, stop strings and incremental detokenization (no model needed)."""

from __future__ import annotations

import pytest
import torch

from v4cli.engine.detok import Detokenizer, StopMatcher
from v4cli.engine.sampling import Sampler, SamplingParams
from quant.errors import BadInput

LOGITS = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))


def probs(**kw) -> torch.Tensor:
    return Sampler(SamplingParams(**kw)).filtered_probs(LOGITS)


def test_no_filters_keeps_distribution():
    assert torch.allclose(probs(), torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]), atol=1e-6)


def test_top_k():
    assert torch.allclose(probs(top_k=2), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]), atol=1e-6)


def test_top_p_keeps_smallest_prefix_reaching_p():
    # 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is needed too
    assert torch.allclose(probs(top_p=0.8), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=1e-6)
    assert torch.allclose(probs(top_p=0.7), torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7, atol=1e-6)
    assert probs(top_p=1e-6)[0] == 1.0


def test_min_p():
    # keep tokens with p ≥ 0.25 · 0.5
    assert torch.allclose(probs(min_p=0.25), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=1e-6)


def test_temperature_sharpens():
    p = probs(temperature=0.5)
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2 / (torch.tensor(
        [0.5, 0.2, 0.15, 0.1, 0.05]) ** 2).sum(), atol=1e-6)


def test_greedy_and_seeded_reproducibility():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert int(Sampler(SamplingParams(temperature=0))(logits)) == int(logits.argmax())
    draw = lambda seed: [int(s(logits)) for s in [Sampler(SamplingParams(seed=seed))] for _ in range(20)]  # noqa
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_sampling_frequencies_follow_probs():
    s = Sampler(SamplingParams(seed=0, top_k=3))
    counts = torch.bincount(torch.stack([s(LOGITS) for _ in range(4000)]), minlength=5).float() / 4000
    assert torch.allclose(counts, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=0.03)
    assert counts[3:].sum() == 0


def test_bad_params():
    with pytest.raises(BadInput):
        SamplingParams(temperature=-1)
    with pytest.raises(BadInput):
        SamplingParams(top_p=0)


def test_stop_matcher_holds_back_and_truncates():
    m = StopMatcher(("</end>",))
    assert m.push("hello </") == ("hello ", False)
    assert m.push("en") == ("", False)
    assert m.push("d> more") == ("", True)
    m = StopMatcher(("</end>",))
    assert m.push("a </b") == ("a </b", False)
    m = StopMatcher(("STOP",))
    assert m.push("xS") == ("x", False)
    assert m.push("x") == ("Sx", False)
    assert m.flush() == ""


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    from v4cli.testing.tiny import official_tokenizer_dir

    return Tokenizer.from_file(str(official_tokenizer_dir() / "tokenizer.json"))


def test_detokenizer_never_splits_utf8(tokenizer):
    text = "Grüße, 世界! 🙂🚀 naïve café — ok"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    d = Detokenizer(tokenizer)
    deltas = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in x for x in deltas)
    # some token must carry only part of an emoji's bytes, so some delta must have been held back
    assert any(x == "" for x in deltas)


def test_detokenizer_with_context_keeps_leading_space(tokenizer):
    ids = tokenizer.encode("Hello world again", add_special_tokens=False).ids
    d = Detokenizer(tokenizer, context=ids[:1])
    assert "".join(d.add(i) for i in ids[1:]) + d.flush() == " world again"
