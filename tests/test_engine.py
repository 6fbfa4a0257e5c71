"""Engine API: generation records, greedy consistency with teacher-forced logits, seeds, stops, `v4 eval`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quant.convert import convert
from quant.recipes import get_recipe
from v4cli.engine import DoneRecord, Engine, SamplingParams, TokenRecord
from v4cli.testing.golden import golden_logits
from v4cli.testing.tiny import build_tensors, random_token_ids, tiny_config, write_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops on a shared 2-core box


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-api")
    cfg = tiny_config("tiny")
    cfg["index_n_heads"] = 16  # see tests/test_model.py: avoids exact indexer top-k ties
    ckpt = write_checkpoint(root / "ckpt", cfg, build_tensors(cfg, seed=0))
    return ckpt, convert(ckpt, root / "tiny-f32.gguf", get_recipe("f32")).path


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.load(tiny[1], kv_format="f32")


def run(engine, ids, **kw):
    recs = list(engine.generate(ids, SamplingParams(**kw)))
    assert isinstance(recs[-1], DoneRecord) and all(isinstance(r, TokenRecord) for r in recs[:-1])
    return [r.token for r in recs[:-1]], recs[-1]


def test_greedy_generation_matches_teacher_forced_argmax(engine):
    prompt = random_token_ids(40, seed=3)
    toks, done = run(engine, prompt, temperature=0, max_tokens=12, stop_on_eos=False)
    assert len(toks) == 12 and done.finish_reason == "length"
    logits = engine.logits(prompt + toks, chunk=16)
    assert toks == logits[len(prompt) - 1: -1].argmax(-1).tolist()
    t = done.timings
    assert t.prompt_tokens == 40 and t.decode_tokens == 11 and t.prefill_tps > 0 and t.decode_tps > 0
    assert 0 < t.ttft_s and done.memory.kv_bytes > 0 and done.memory.peak_rss_bytes > 0


def test_seeded_sampling_is_reproducible(engine):
    prompt = random_token_ids(20, seed=4)
    a, _ = run(engine, prompt, seed=11, max_tokens=8, stop_on_eos=False)
    b, _ = run(engine, prompt, seed=11, max_tokens=8, stop_on_eos=False)
    c, _ = run(engine, prompt, seed=12, max_tokens=8, stop_on_eos=False)
    assert a == b and a != c


def test_generation_continues_a_cache_exactly(engine):
    prompt = random_token_ids(30, seed=5)
    full, _ = run(engine, prompt, temperature=0, max_tokens=6, stop_on_eos=False)
    cache = engine.new_cache()
    engine.prefill(prompt[:17], cache, chunk=5)
    recs = list(engine.generate(prompt[17:], SamplingParams(temperature=0, max_tokens=6, stop_on_eos=False),
                                cache=cache))
    assert [r.token for r in recs[:-1]] == full


def test_stop_on_eos(engine):
    prompt = random_token_ids(20, seed=6)
    first, _ = run(engine, prompt, temperature=0, max_tokens=1, stop_on_eos=False)
    from dataclasses import replace

    # ModelArgs is frozen: swap in a copy whose EOS is the token greedy decoding picks first
    real = engine.model.args
    engine.model.args = replace(real, eos_token_id=first[0])
    try:
        toks, done = run(engine, prompt, temperature=0, max_tokens=5)
    finally:
        engine.model.args = real
    assert toks == [] and done.finish_reason == "eos"


def test_stop_string_truncates_text(engine):
    prompt = random_token_ids(20, seed=7)
    recs = list(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=10, stop_on_eos=False)))
    text = "".join(r.text for r in recs)
    stop = text[3:6]
    assert stop
    recs = list(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=10, stop=(stop,),
                                                       stop_on_eos=False)))
    assert recs[-1].finish_reason == "stop"
    assert "".join(r.text for r in recs) == text[: text.find(stop)]


def test_eval_command_dumps_golden_logits(tiny, tmp_path):
    from v4cli.cli import main

    ckpt, gguf = tiny
    ids = random_token_ids(100, seed=8)
    tok_file = tmp_path / "ids.txt"
    tok_file.write_text(" ".join(map(str, ids)))
    out = tmp_path / "logits.npy"
    main(["eval", str(gguf), "--tokens", str(tok_file), "--chunk", "33", "--kv-format", "f32",
          "--dump-logits", str(out)])  # returns normally on success
    got = torch.from_numpy(np.load(out))
    ref = golden_logits(ckpt, ids)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernels", ["reference", "fast"])
def test_cuda_graph_replay_matches_eager(tiny, tmp_path, monkeypatch, kernels):
    # decode with every block's pre / post and the head replayed from CUDA graphs, against the same file run
    # eagerly; q8 weights, so "fast" runs the Triton kernels inside the graphs
    from v4cli.engine.cuda_graphs import Graphed

    gguf = convert(tiny[0], tmp_path / "tiny-q8.gguf", get_recipe("q8")).path
    if kernels == "fast":
        monkeypatch.delenv("V4_KERNELS", raising=False)
    monkeypatch.setenv("V4_CUDA_GRAPHS", "0")
    eager = Engine.load(gguf, kv_format="f32", device="cuda")
    monkeypatch.delenv("V4_CUDA_GRAPHS")
    graphed = Engine.load(gguf, kv_format="f32", device="cuda")
    assert isinstance(graphed.model.blocks[0].post, Graphed) and not isinstance(eager.model.blocks[0].post, Graphed)
    prompt = random_token_ids(30, seed=9)
    logits = []
    for eng in (eager, graphed):
        cache = eng.new_cache()
        eng.prefill(prompt, cache, chunk=16)
        steps = [eng.model.forward(torch.tensor([t], device="cuda"), cache, last_only=True) for t in prompt[:6]]
        logits.append(torch.cat(steps))
    assert len(graphed.model.blocks[0].post.graphs) == 1  # captured once, replayed for every later token
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_eval_needs_exactly_one_input(tiny, capsys):
    from v4cli.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", str(tiny[1])])
    assert e.value.code == 2
    assert "--text" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_matches_cpu(tiny, engine):
    # the whole forward on the GPU (reference kernels, torch's SDPA), from an empty cache: chunked prefill over
    # the compressors' windows, then token-by-token decode, against the CPU engine
    gpu = Engine.load(tiny[1], kv_format="f32", device="cuda")
    prompt = random_token_ids(40, seed=5)
    want = engine.logits(prompt, chunk=16)
    got = gpu.logits(prompt, chunk=16)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)
    toks, _ = run(engine, prompt, temperature=0, max_tokens=8, stop_on_eos=False)
    assert run(gpu, prompt, temperature=0, max_tokens=8, stop_on_eos=False)[0] == toks
