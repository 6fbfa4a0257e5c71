"""benchmarks/plan_check.py's machinery on the tiny model: the fill it uses for long contexts holds what a real
prefill holds, and the planner's KV bytes and bytes read per token agree with what the cache and one decode step
count (deterministic counts; RSS is left to the benchmark)."""

from __future__ import annotations

import pytest

from benchmarks import plan_check as pc
from v4cli.engine.loader import load_model

CTX = 512


def _layout(cache) -> list:
    """Every tensor the cache holds (shape and dtype: the buffers' capacities too) and every counter."""
    out = [cache.pos]
    for lc in cache.layers:
        for rows in [lc.window] + [p.entries for p in lc.parts().values()]:
            out.append((rows.n, rows.start, {k: (tuple(v.shape), v.dtype) for k, v in rows.parts.items()}))
        for p in lc.parts().values():
            out.append((p.count, [None if getattr(p, k) is None else tuple(getattr(p, k).shape)
                                  for k in pc._STATE_TENSORS]))
    return out


@pytest.fixture(scope="module")
def model_file(tiny_gguf):
    return tiny_gguf("q8")


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_append_fill_holds_what_a_prefill_holds(model_file, fmt, one_thread):
    model, _ = load_model(model_file)
    real, fake = model.make_cache(fmt), model.make_cache(fmt)
    pc.fill_prefill(model, real, CTX + 3)  # a partial compressor window left over
    pc.fill_append(model, fake, CTX + 3)
    assert _layout(fake) == _layout(real)
    assert pc.cache_bytes(fake) == pc.cache_bytes(real)


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_plan_agrees_with_the_cache_and_one_decode_step(model_file, fmt, one_thread):
    model, _ = load_model(model_file)
    cache = model.make_cache(fmt)
    pc.fill_append(model, cache, CTX)
    p = pc.planned(model_file, CTX, fmt)
    held = pc.cache_bytes(cache)
    assert held["kv_held"] == p.kv
    counted = pc.count_decode_step(model, cache)
    # the tiny model's embedding row is small beside its hash-routing rows, which the model reads from an int64
    # copy of the file's I32 table: 16 bytes more than planned
    for comp, rel in (("dense", 0.03), ("experts", 0.0), ("embedding", 0.05), ("kv", 0.03)):
        assert counted[comp] == pytest.approx(p.read[comp], rel=rel), comp
    assert 0 < counted["state"] == p.read["state"]
