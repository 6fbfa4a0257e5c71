"""Session: a prompt that shares a prefix with what the session holds prefills only the rest, with the same
tokens as a fresh run; marks let a diverging prompt restart from a snapshot; interruption never corrupts state."""

from __future__ import annotations

import pytest
import torch

from v4cli.engine import Engine, SamplingParams, TokenRecord
from v4cli.engine.session import Session, common_prefix
from v4cli.testing.tiny import random_token_ids


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops on a shared 2-core box


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    return Engine.load(tiny_gguf("f32"), kv_format="f32")


GREEDY = SamplingParams(temperature=0.0, max_tokens=6, stop_on_eos=False)


def tokens(records):
    return [r.token for r in records if isinstance(r, TokenRecord)]


def fresh(engine, prompt):
    return tokens(engine.generate(prompt, GREEDY))


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0 and common_prefix([5], [5]) == 1


def test_extension_prefills_only_new_tokens(engine):
    p1 = random_token_ids(40, seed=1)
    s = Session(engine, chunk=16)
    out1 = tokens(s.generate(p1, GREEDY))
    assert out1 == fresh(engine, p1) and s.reused == 0
    # next turn = previous prompt + what was generated + new text
    p2 = p1 + out1 + random_token_ids(9, seed=2)
    out2 = tokens(s.generate(p2, GREEDY))
    assert s.reused == len(p1) + len(out1) - 1  # the last sampled token was never fed back
    assert out2 == fresh(engine, p2)


def test_divergent_prompt_restarts_from_mark(engine):
    shared = random_token_ids(30, seed=3)
    p1 = shared + random_token_ids(5, seed=4)
    s = Session(engine, chunk=8)
    list(s.generate(p1, GREEDY, marks=[len(shared)]))
    p2 = shared + random_token_ids(7, seed=5)  # diverges right after the mark
    out2 = tokens(s.generate(p2, GREEDY))
    assert s.reused == len(shared)
    assert out2 == fresh(engine, p2)
    # a prompt sharing less than any snapshot starts over
    p3 = shared[:10] + random_token_ids(4, seed=6)
    assert tokens(s.generate(p3, GREEDY)) == fresh(engine, p3) and s.reused == 0


def test_same_prompt_twice_reuses_all_but_last(engine):
    p = random_token_ids(25, seed=7)
    s = Session(engine)
    first = tokens(s.generate(p, GREEDY, marks=[len(p) - 1]))
    assert tokens(s.generate(p, GREEDY)) == first and s.reused == len(p) - 1


def test_stopping_mid_answer_keeps_session_consistent(engine):
    p1 = random_token_ids(20, seed=8)
    s = Session(engine)
    gen = s.generate(p1, SamplingParams(temperature=0.0, max_tokens=50, stop_on_eos=False))
    got = [next(gen).token for _ in range(3)]
    gen.close()  # what the chat UI does on Ctrl-C
    assert s.tokens == p1 + got[:-1]
    p2 = p1 + got + random_token_ids(5, seed=9)
    assert tokens(s.generate(p2, GREEDY)) == fresh(engine, p2)
    assert s.reused == len(p1) + 2


def test_progress_reports_prefill(engine):
    seen = []
    p = random_token_ids(50, seed=10)
    s = Session(engine, chunk=16)
    list(s.generate(p, GREEDY, progress=lambda done, total: seen.append((done, total))))
    assert seen[-1] == (50, 50) and all(t == 50 for _, t in seen) and [d for d, _ in seen] == sorted(d for d, _ in seen)
