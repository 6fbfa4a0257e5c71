"""The fused one-token block halves: their reference (kernels/decode.py) against the model's own composition, the
compiled CPU kernel against that reference, and the loader's swap (v4cli/engine/specialize.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from kernels import cpu_ext, decode
from quant.errors import BadInput
from v4cli.engine import Engine
from v4cli.engine.specialize import FusedPost, FusedPre, post_weights, pre_weights
from v4cli.model import deepseek4
from v4cli.model.deepseek4 import Block

pytestmark = pytest.mark.usefixtures("one_thread")
needs_cpu_kernels = pytest.mark.skipif(cpu_ext.usable() is None,
                                       reason="CPU kernels did not build (no compiler or no AVX2)")


def rel_rms(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def _one_token_inputs(blk: Block, seed: int):
    """Streams X [1, S, D] at one position, and an attention output [1, H, d] for `post`."""
    g = torch.Generator().manual_seed(seed)
    S, D = blk.attn_hc.p.S, blk.attn_norm.shape[0]
    X, pos = torch.randn(1, S, D, generator=g), torch.tensor([37 + seed])
    return X, pos, torch.randn(1, blk.attn.H, blk.attn.d, generator=g) * 0.3


@pytest.mark.parametrize("kernels", ["reference", "fast"])
@pytest.mark.parametrize("recipe", ["lossless", "q8"])
def test_reference_halves_are_the_model_composition(tiny_gguf, recipe, kernels, request):
    # Built from a loaded block's attributes, reference_pre / reference_post run the same ops on the same weights as
    # the model's Block.pre / Block.post, so they agree to the last bit (with either kernel set): the weight packs
    # hold the right tensors. Every layer kind: hash and score routing, each attention kind.
    if kernels == "fast":
        if cpu_ext.usable() is None:
            pytest.skip("CPU kernels did not build")
        request.getfixturevalue("fast_kernels")
    model = Engine.load(tiny_gguf(recipe), kv_format="f32").model
    ids = torch.tensor([11])
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            X, pos, out = _one_token_inputs(blk, i)
            ref = decode.reference_pre(pre_weights(blk), X, pos)
            got = Block.pre(blk, X, pos)
            assert len(ref) == len(got) == 7
            for a, b in zip(ref, got):
                assert a.dtype == b.dtype and torch.equal(a, b)
            _, _, _, _, cs, post, comb = got
            ref_X = decode.reference_post(post_weights(blk), out, cs, X, post, comb, ids)
            assert torch.equal(ref_X, Block.post(blk, out, cs, X, post, comb, ids))
    assert {blk.moe.hash for blk in model.blocks} == {True, False}
    assert len({blk.attn.ratio for blk in model.blocks}) == 3


@needs_cpu_kernels
@pytest.mark.parametrize("recipe", ["lossless", "q8"])
def test_fused_halves_match_their_reference(tiny_gguf, recipe, fast_kernels):
    # The compiled one-token pre / post (kernels/cpu/decode.cpp) against reference_pre / reference_post over the same
    # fast kernels. pre: the same calls, only RoPE's cos/sin and the complex product round differently (≤ 1e-6). post:
    # the inverse RoPE's rounding can flip an int8 (or bf16) activation rounding in the output projection, and the
    # router's dot order differs, so ≤ 2e-3 relative.
    model = Engine.load(tiny_gguf(recipe), kv_format="f32").model
    ids = torch.tensor([11])
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            X, pos, out = _one_token_inputs(blk, i)
            pw, qw = blk.pre.weights, blk.post.weights
            fused, ref = decode.block_pre(pw, X, pos), decode.reference_pre(pw, X, pos)
            assert fused is not None
            for a, b in zip(fused, ref):
                assert a.shape == b.shape and a.dtype == b.dtype
                a, b = (torch.view_as_real(t) if t.is_complex() else t for t in (a, b))
                assert rel_rms(a, b) <= 1e-6
            cs, post, comb = ref[4:]
            fused_X = decode.block_post(qw, out, cs, X, post, comb, ids)
            ref_X = decode.reference_post(qw, out, cs, X, post, comb, ids)
            assert fused_X is not None and fused_X.shape == ref_X.shape
            assert rel_rms(fused_X, ref_X) <= 2e-3


@needs_cpu_kernels
def test_fused_decode_declines_what_it_does_not_cover(tiny_gguf, fast_kernels):
    blk = Engine.load(tiny_gguf("lossless"), kv_format="f32").model.blocks[0]
    X, pos, _ = _one_token_inputs(blk, 0)
    w = blk.pre.weights
    assert decode.block_pre(w, X.double(), pos) is None  # not f32
    assert decode.block_pre(w, X.repeat(2, 1, 1), torch.tensor([3, 4])) is None  # two tokens
    assert decode.block_pre(w, X, pos) is not None


@needs_cpu_kernels
def test_fused_decode_rejects_a_token_outside_the_hash_table(tiny_gguf, fast_kernels):
    blk = next(b for b in Engine.load(tiny_gguf("lossless"), kv_format="f32").model.blocks if b.moe.hash)
    X, pos, out = _one_token_inputs(blk, 0)
    x, q, kv, qr, cs, post, comb = decode.block_pre(blk.pre.weights, X, pos)
    with pytest.raises(BadInput):
        decode.block_post(blk.post.weights, out, cs, X, post, comb, torch.tensor([blk.moe.tid2eid.shape[0]]))


@needs_cpu_kernels
def test_loading_swaps_in_the_fused_halves(tiny_gguf, monkeypatch, fast_kernels):
    # With the compiled kernels, every block of a CPU model runs its decode halves fused (one kernel call a half per
    # token) and its chunks through the model's own methods; loaded under V4_KERNELS=reference, nothing is swapped
    # and no fused call runs (nor in the model loaded before, once the references are on).
    calls = {"pre": 0, "post": 0}

    def counted(name, fn):
        def run(*args):
            out = fn(*args)
            calls[name] += out is not None
            return out
        return run

    monkeypatch.setattr(decode, "block_pre", counted("pre", decode.block_pre))
    monkeypatch.setattr(decode, "block_post", counted("post", decode.block_post))
    path = tiny_gguf("q8")

    def step(model):
        cache = model.make_cache("f32")
        with torch.no_grad():
            model.forward(torch.arange(5, 12), cache)
            before = dict(calls)
            model.forward(torch.tensor([12]), cache)
        return {k: calls[k] - before[k] for k in calls}

    fused = Engine.load(path, kv_format="f32").model
    n = len(fused.blocks)
    assert all(isinstance(b.pre, FusedPre) and isinstance(b.post, FusedPost) and not b.split for b in fused.blocks)
    assert calls == {"pre": 0, "post": 0}  # not in the 7-token chunk
    assert step(fused) == {"pre": n, "post": n}
    monkeypatch.setenv("V4_KERNELS", "reference")
    plain = Engine.load(path, kv_format="f32").model
    assert not any({"pre", "post"} & set(vars(b)) for b in plain.blocks)  # the class's own methods
    assert step(plain) == {"pre": 0, "post": 0}
    assert step(fused) == {"pre": 0, "post": 0}


def test_the_model_file_imports_no_placement_or_fused_kernels():
    tree = ast.parse(Path(deepseek4.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    banned = {"kernels.decode", "kernels.offload", "kernels.backends", "kernels.dispatch", "v4cli.planning",
              "v4cli.engine"}
    assert not {m for m in imported if any(m == b or m.startswith(b + ".") for b in banned)}
    assert "kernels.linear" in imported  # the parse saw the imports
