"""LlamaEngine (llama.cpp behind the Engine interface) against the torch Engine on the same tiny-128 GGUF."""

from __future__ import annotations

import ctypes
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")

from v4cli.engine import DoneRecord, Engine, SamplingParams, TokenRecord
from v4cli.engine.llama import (
    KV_TYPES,
    LlamaEngine,
    _BuftOverride,
    build_overrides,
    expert_override_patterns,
)
from v4cli.engine.select import load_engine
from quant.errors import BadInput, GGUFError, NotFoundError
from v4cli.testing.tiny import random_token_ids

pytestmark = [pytest.mark.llama, pytest.mark.usefixtures("one_thread")]  # one_thread: see conftest

PRESET = "tiny-128"  # the preset llama.cpp loads (HCA ratio 128)
REL_TOL = 1e-4  # measured 9.5e-7 over 300 tokens: both run the exact f32 path


@pytest.fixture(scope="module")
def f32_gguf(tiny_gguf):
    return tiny_gguf("f32", PRESET)


@pytest.fixture(scope="module")
def llama(f32_gguf):
    eng = LlamaEngine.load(f32_gguf, kv_format="f32", n_threads=1, n_ctx=256)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def torch_engine(f32_gguf):
    return Engine.load(f32_gguf, kv_format="f32")


def tokens(engine, ids, **kw):
    recs = list(engine.generate(ids, SamplingParams(**kw)))
    assert isinstance(recs[-1], DoneRecord) and all(isinstance(r, TokenRecord) for r in recs[:-1])
    return [r.token for r in recs[:-1]], recs[-1]


def test_logits_match_torch_engine(llama, torch_engine):
    ids = random_token_ids(300, seed=1)  # > n_ctx 256: the context grows; crosses two HCA-128 windows
    a = llama.logits(ids, chunk=100)
    b = torch_engine.logits(ids, chunk=100)
    assert a.dtype == torch.float32 and a.shape == (300, llama.args.vocab_size)
    err = ((a - b).abs().max(dim=1).values / b.abs().max()).max().item()
    assert err < REL_TOL
    assert llama.n_ctx >= 300


def test_greedy_generation_matches_torch_engine(llama, torch_engine):
    prompt = random_token_ids(40, seed=3)
    ours, done = tokens(llama, prompt, temperature=0, max_tokens=10, stop_on_eos=False)
    ref, _ = tokens(torch_engine, prompt, temperature=0, max_tokens=10, stop_on_eos=False)
    assert ours == ref and len(ours) == 10
    t = done.timings
    assert done.finish_reason == "length" and t.prompt_tokens == 40 and t.decode_tokens == 9
    assert 0 < t.prefill_s <= t.ttft_s and t.decode_s > 0 and t.decode_tps > 0
    assert done.memory.peak_rss_bytes > 0 and done.memory.kv_bytes > 0


def test_seeded_sampling_matches_torch_engine(llama, torch_engine):
    # same logits (to ~1e-6) + same Sampler + same seed → the same draws in both engines
    prompt = random_token_ids(20, seed=4)
    kw = {"seed": 5, "max_tokens": 6, "top_k": 50, "top_p": 0.9, "stop_on_eos": False}
    assert tokens(llama, prompt, **kw)[0] == tokens(torch_engine, prompt, **kw)[0]
    assert tokens(llama, prompt, **kw)[0] != tokens(llama, prompt, **{**kw, "seed": 6})[0]


def test_two_caches_interleave_exactly(llama):
    a, b = random_token_ids(30, seed=5), random_token_ids(25, seed=6)
    ref_a, _ = tokens(llama, a, temperature=0, max_tokens=4, stop_on_eos=False)
    ref_b, _ = tokens(llama, b, temperature=0, max_tokens=4, stop_on_eos=False)
    ca, cb = llama.new_cache(), llama.new_cache()
    llama.prefill(a[:17], ca)
    llama.prefill(b[:11], cb)  # ca's state is saved aside and restored below
    sp = SamplingParams(temperature=0, max_tokens=4, stop_on_eos=False)
    got_a = [r.token for r in list(llama.generate(a[17:], sp, cache=ca))[:-1]]
    got_b = [r.token for r in list(llama.generate(b[11:], sp, cache=cb))[:-1]]
    assert (got_a, got_b) == (ref_a, ref_b)
    assert ca.pos == 30 + 3 and ca.nbytes() > 0


def test_session_restores_a_snapshot_on_the_llama_engine(llama):
    """A prompt that diverges from the live cache after a marked prefix (a chat turn in thinking mode, whose reasoning
    the next prompt drops) restores the snapshot into a fresh llama cache: same tokens as a cold run."""
    from v4cli.engine.session import Session

    a = random_token_ids(40, seed=3)
    b = a[:30] + random_token_ids(8, seed=4)
    session = Session(llama, chunk=16)
    list(session.generate(a, SamplingParams(temperature=0, max_tokens=4), marks=[30]))
    got = [r.token for r in session.generate(b, SamplingParams(temperature=0, max_tokens=6))
           if isinstance(r, TokenRecord)]
    assert session.reused == 30
    assert got == tokens(llama, b, temperature=0, max_tokens=6)[0]


def test_llama_cache_refuses_a_state_without_its_length(llama):
    from v4cli.model.cache import BadState

    with pytest.raises(BadState):
        llama.new_cache().load_bytes(b"state")
    with pytest.raises(BadState):
        llama.new_cache().load_bytes(b"", 12)


def test_stop_on_eos(llama):
    prompt = random_token_ids(20, seed=6)
    first, _ = tokens(llama, prompt, temperature=0, max_tokens=1, stop_on_eos=False)
    real = llama.args
    llama.args = replace(real, eos_token_id=first[0])
    try:
        toks, done = tokens(llama, prompt, temperature=0, max_tokens=5)
    finally:
        llama.args = real
    assert toks == [] and done.finish_reason == "eos"


def test_stop_string_truncates_text(llama):
    prompt = random_token_ids(20, seed=7)
    sp = SamplingParams(temperature=0, max_tokens=10, stop_on_eos=False)
    text = "".join(r.text for r in llama.generate(prompt, sp))
    stop = text[3:6]
    assert stop
    recs = list(llama.generate(prompt, replace(sp, stop=(stop,))))
    assert recs[-1].finish_reason == "stop"
    assert "".join(r.text for r in recs) == text[: text.find(stop)]


def test_too_long_for_a_used_cache_is_bad_input(llama):
    cache = llama.new_cache()
    llama.prefill([5, 6, 7], cache)
    with pytest.raises(BadInput, match="llama context"):
        llama.prefill(random_token_ids(llama.n_ctx, seed=8), cache)


def test_bad_files(tmp_path):
    with pytest.raises(NotFoundError):
        LlamaEngine.load(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(GGUFError):
        LlamaEngine.load(junk)


def test_kv_formats_load(f32_gguf):
    # bf16 → ggml BF16 K/V; fp8 → Q8_0 K/V, which llama.cpp only accepts with flash attention
    assert (KV_TYPES["bf16"].ggml_type, KV_TYPES["fp8"].ggml_type, KV_TYPES["fp8"].flash_attn) == (30, 8, True)
    ids = random_token_ids(20, seed=9)
    ref = None
    for fmt in ("bf16", "fp8"):
        eng = LlamaEngine.load(f32_gguf, kv_format=fmt, n_threads=1, n_ctx=64)
        try:
            x = eng.logits(ids)
        finally:
            eng.close()
        assert torch.isfinite(x).all()
        ref = x if ref is None else ref
        assert ((x - ref).abs().max() / ref.abs().max()).item() < 0.1
    with pytest.raises(BadInput, match="kv format"):
        LlamaEngine.load(f32_gguf, kv_format="int3")


def test_expert_override_list():
    patterns = expert_override_patterns()
    assert patterns == [r"ffn_gate_exps\.weight", r"ffn_up_exps\.weight", r"ffn_down_exps\.weight"]
    import re

    assert re.search(patterns[2], "blk.7.ffn_down_exps.weight")
    assert not any(re.search(p, "blk.7.ffn_down_shexp.weight") for p in patterns)
    arr = build_overrides(patterns, buft=0x1234)
    assert len(arr) == 4 and isinstance(arr[0], _BuftOverride)
    assert [arr[i].pattern for i in range(3)] == [p.encode() for p in patterns]
    assert all(arr[i].buft == 0x1234 for i in range(3))
    assert arr[3].pattern is None and not arr[3].buft  # the NULL terminator llama.cpp stops at
    assert ctypes.sizeof(_BuftOverride) == 2 * ctypes.sizeof(ctypes.c_void_p)


def test_load_engine_selects(f32_gguf, llama):
    eng = load_engine(f32_gguf, "llama", kv_format="f32", threads=1, n_ctx=32)
    try:
        assert isinstance(eng, LlamaEngine) and eng.n_threads == 1 and eng.kv_format == "f32"
    finally:
        eng.close()
    assert isinstance(load_engine(f32_gguf, "torch", kv_format="f32"), Engine)
    with pytest.raises(BadInput, match="torch, llama"):
        load_engine(f32_gguf, "vllm")
    with pytest.raises(BadInput, match="device"):
        load_engine(f32_gguf, "llama", device="cuda")


def test_eval_command_with_llama_engine(f32_gguf, torch_engine, tmp_path):
    from typer.testing import CliRunner

    from v4cli.cli import app

    ids = random_token_ids(60, seed=10)
    (tmp_path / "ids.json").write_text(str(ids))
    out = tmp_path / "logits.npy"
    r = CliRunner().invoke(app, ["eval", str(f32_gguf), "--tokens", str(tmp_path / "ids.json"), "--engine", "llama",
                                 "--kv-format", "f32", "--threads", "1", "--chunk", "25", "--dump-logits", str(out)])
    assert r.exit_code == 0, r.output
    assert "engine llama" in r.output and "perplexity" in r.output
    got = torch.from_numpy(np.load(out))
    ref = torch_engine.logits(ids)
    assert got.shape == ref.shape and ((got - ref).abs().max() / ref.abs().max()).item() < REL_TOL
