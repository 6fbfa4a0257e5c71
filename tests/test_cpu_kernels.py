"""Parity of the compiled CPU kernels (kernels/fast.py) with the torch references in kernels/linear.py.

Tolerances: integer types quantize activations to int8 per 32 values (the fused kernels and, for many rows, the
int8 GEMM), so they are held to relative RMS error ≤ 1e-2 against reference_linear (measured ~5e-3). BF16 rows
on a CPU with AVX512-BF16 dot activations rounded to bf16 (measured ~1.6e-3), held to ≤ 5e-3; everywhere else
BF16/F16 use f32 activations and, for many rows, the tiled GEMM over a bit-exact dequantization, held to ≤ 1e-5
(summation order only). The dequantizers are bit-exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from kernels import backends, cpu_ext, fast
from kernels.linear import QWeight, linear, linear_many, reference_linear, reference_routed_experts, routed_experts
from quant.formats import quantize
from quant.errors import BadInput

pytestmark = [pytest.mark.skipif(cpu_ext.usable() is None, reason="CPU kernels did not build (no compiler or no AVX2)"),
              pytest.mark.usefixtures("fast_kernels")]  # conftest defaults the suite to the reference kernels


INT_TYPES = (Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q2_K, Q.Q3_K, Q.Q6_K, Q.MXFP4)
FLOAT_TYPES = (Q.BF16, Q.F16)
INT_TOL, BF16_TOL, FLOAT_TOL = 1e-2, 5e-3, 1e-5


def tol(qtype: Q, M: int = 1) -> float:
    """The parity bound for the kernel `cpu_linear` picks for M rows of this type (see the module docstring)."""
    if qtype not in FLOAT_TYPES:
        return INT_TOL
    return BF16_TOL if qtype == Q.BF16 and M < fast.GEMM_MIN_ROWS else FLOAT_TOL


def _f16_bytes(n: int, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, n).astype(np.float16).view(np.uint8).reshape(n, 2)


def make_weight(qtype: Q, shape: tuple[int, ...], seed: int = 0) -> QWeight:
    """Valid random blocks: quant/formats.py's quantizers where they exist, else random bytes with sane scales."""
    rng = np.random.default_rng(seed)
    if qtype in (Q.MXFP4, Q.Q5_K):
        bs, ts = GGML_QUANT_SIZES[qtype]
        nb = int(np.prod(shape)) // bs
        b = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
        if qtype == Q.MXFP4:
            b[:, 0] = rng.integers(118, 130, nb)  # E8M0 exponents near 1
        else:
            b[:, 0:2] = _f16_bytes(nb, rng, 0.001, 0.01)  # d
            b[:, 2:4] = _f16_bytes(nb, rng, 0.001, 0.01)  # dmin
        raw = b.reshape(-1)
    else:
        raw = quantize(rng.standard_normal(shape).astype(np.float32), qtype).reshape(-1)
    return QWeight(torch.from_numpy(raw.copy()), qtype, shape)


def rel_rms(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


@pytest.mark.parametrize("qtype", INT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(qtype):
    w = make_weight(qtype, (37, 512))
    assert torch.equal(fast.dequantize(w), w.dense())


@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("qtype", INT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_linear_matches_reference(qtype, M):
    w = make_weight(qtype, (37, 512), seed=M)
    x = torch.randn(M, 512, generator=torch.Generator().manual_seed(M))
    y = fast.cpu_linear(x, w)
    ref = reference_linear(x, w)
    assert y.shape == (M, 37)
    assert rel_rms(y, ref) <= tol(qtype, M)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.MXFP4], ids=lambda t: t.name)
def test_fused_path_at_prefill_sizes(qtype):
    # the fused kernel must stay correct past its 4-row groups even where the dispatcher prefers the GEMM
    w = make_weight(qtype, (33, 256))
    x = torch.randn(fast.GEMM_MIN_ROWS + 5, 256)
    assert rel_rms(fast.matvec(x, w), reference_linear(x, w)) <= INT_TOL


def test_rows_are_independent():
    # each output row sees only its own activation row: row i of a batch equals a single-row call
    w = make_weight(Q.Q4_K, (21, 256))
    x = torch.randn(6, 256)
    batch = fast.matvec(x, w)
    for i in range(6):
        assert torch.allclose(batch[i], fast.matvec(x[i:i + 1].contiguous(), w)[0], rtol=0, atol=0)


def test_dispatcher_uses_fast_kernel_and_keeps_shape():
    w = make_weight(Q.Q8_0, (19, 256))
    x = torch.randn(2, 3, 256)
    y = linear(x, w)
    assert y.shape == (2, 3, 19)
    assert torch.equal(y, fast.cpu_linear(x.reshape(6, 256), w).view(2, 3, 19))
    assert not torch.equal(y, reference_linear(x, w))  # int8 activations: proves the fast path ran


def test_reference_forced_by_env(monkeypatch):
    monkeypatch.setenv("V4_KERNELS", "reference")
    backends.load()  # read at load, as the engine loader does
    w = make_weight(Q.Q4_K, (19, 256))
    x = torch.randn(2, 256)
    assert torch.equal(linear(x, w), reference_linear(x, w))


def test_non_contiguous_input():
    w = make_weight(Q.MXFP4, (9, 128))
    x = torch.randn(128, 4).t()  # (4, 128), a transposed view
    assert rel_rms(fast.cpu_linear(x, w), reference_linear(x, w)) <= INT_TOL


@pytest.mark.parametrize("qtype,K", [(Q.MXFP4, 32 * 13), (Q.MXFP4, 32 * 67), (Q.MXFP4, 32 * 130),
                                     (Q.Q8_0, 32 * 5), (Q.Q8_0, 32 * 13),
                                     (Q.BF16, 48), (Q.BF16, 16 * 67 + 5)],
                         ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("M", [1, 3])
def test_row_lengths_off_the_unrolled_steps(qtype, K, M):
    # MXFP4 decodes block pairs in 64-block chunks with scales built 8 at a time, Q8_0 builds scales 8 blocks at a
    # time, BF16 steps 32 elements: an odd block count, a partial group of 8 and a second chunk (MXFP4), fewer than
    # 8 blocks or a tail after them (Q8_0), an odd 16 and a tail (BF16) take other paths
    w = make_weight(qtype, (5, K), seed=K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K))
    assert rel_rms(fast.matvec(x, w), reference_linear(x, w)) <= tol(qtype, M)


def _matvec_agreeing_with_the_avx2_build(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """fast.matvec(x, w) on this CPU's widest build, held to ≤ 1e-6 of the AVX2 build's (summation order only);
    skips on a CPU that has only the AVX2 build."""
    native = fast._lib.v4_isa()
    if native < 2:
        pytest.skip("this CPU has only the AVX2 build")
    y = fast.matvec(x, w)
    assert fast._lib.v4_set_isa(1) == 1
    try:
        assert rel_rms(fast.matvec(x, w), y) <= 1e-6
    finally:
        fast._lib.v4_set_isa(native)
    return y


@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.MXFP4], ids=lambda t: t.name)
def test_isa_builds_agree(qtype, M):
    # Q8_0: VNNI dots w + 128 and takes 128·Σq back in integers, AVX2 dots |w| with x·sign(w): both give each
    # block's exact integer dot (-128 included), spread differently over the 8 lanes, so only f32 summation order
    # differs. MXFP4: vpdpbusd vs maddubs + madd over the same lanes. 21 blocks: two 8-block steps, then a tail
    # of two pairs and an odd block.
    w = make_weight(qtype, (23, 32 * 21), seed=M)
    if qtype == Q.Q8_0:
        w.raw.view(-1, 34)[::7, 2:5] = 0x80  # int8 -128, which |w| and w + 128 both have to get right
    x = torch.randn(M, 32 * 21, generator=torch.Generator().manual_seed(M))
    y = _matvec_agreeing_with_the_avx2_build(x, w)
    assert rel_rms(y, reference_linear(x, w)) <= INT_TOL


@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("K", [128 * 5, 4096])
def test_mxfp4_512bit_rows_agree_with_the_256bit_build(K, M):
    # Rows of whole 4-block groups take the AVX512-VBMI kernel (vpermt2b / vpermb decode, lane seeds −12·Σq,
    # vscalefps exponents) where the CPU has it; the AVX2 build dots the same blocks pairwise. Exponent bytes 0
    # and 1 (subnormal scales) and 2 (the first normal one) sit among ordinary ones; only the f32 summation
    # order may differ.
    w = make_weight(Q.MXFP4, (29, K), seed=K + M)
    w.raw.view(-1, 17)[::5, 0] = torch.tensor([0, 1, 2], dtype=torch.uint8).repeat(29 * K // 32 // 5 // 3 + 1)[
        : len(range(0, 29 * K // 32, 5))]
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    y = _matvec_agreeing_with_the_avx2_build(x, w)
    assert rel_rms(y, reference_linear(x, w)) <= INT_TOL


def test_float_row_tail():
    # BF16 rows need not be a multiple of the 16-wide vector step
    w = make_weight(Q.BF16, (7, 75))
    x = torch.randn(3, 75)
    assert rel_rms(fast.cpu_linear(x, w), reference_linear(x, w)) <= BF16_TOL


@pytest.mark.parametrize("K", [75, 4096])
def test_bf16_without_the_bf16_dot_is_exact(K):
    # the AVX2 build's shift/mask decode multiplies f32 activations: summation order only
    native = fast._lib.v4_isa()
    assert fast._lib.v4_set_isa(1) == 1
    try:
        w = make_weight(Q.BF16, (9, K))
        x = torch.randn(2, K)
        assert rel_rms(fast.cpu_linear(x, w), reference_linear(x, w)) <= FLOAT_TOL
    finally:
        fast._lib.v4_set_isa(native)


def test_failed_build_keeps_reference(monkeypatch):
    def broken():
        raise cpu_ext.KernelBuildError("no compiler")

    monkeypatch.setattr(cpu_ext, "load", broken)
    assert fast.install() is False


def test_build_is_cached():
    assert cpu_ext.build() == cpu_ext.build()
    assert cpu_ext.build().exists()


MOE_CASES = {
    "mxfp4": (Q.MXFP4, Q.MXFP4, Q.MXFP4),
    "q2k-q4k": (Q.Q2_K, Q.Q2_K, Q.Q4_K),
    "q8_0-q6k": (Q.Q8_0, Q.Q3_K, Q.Q6_K),
    "bf16": (Q.BF16, Q.BF16, Q.BF16),
}


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_routed_experts_match_reference(case, T):
    t1, t3, t2 = MOE_CASES[case]
    E, D, I, k = 5, 256, 512, 3
    w1, w3, w2 = make_weight(t1, (E, I, D), 1), make_weight(t3, (E, I, D), 2), make_weight(t2, (E, D, I), 3)
    g = torch.Generator().manual_seed(T)
    limit = 6.0
    # gate/up pre-activations of std limit/2: the clamps bite in the tails, as in the model. (Clamping far into
    # saturation would shrink h far below the pre-activation's scale and magnify int8 rounding relative to it.)
    x = torch.randn(T, D, generator=g) * (limit / 2) / (w1.dense().std() * D ** 0.5)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    wts = torch.rand(T, k, generator=g)
    ref = reference_routed_experts(x, idx, wts, w1, w3, w2, limit)
    y = fast.cpu_routed_experts(x, idx, wts, w1, w3, w2, limit)
    bound = 2 * (BF16_TOL if case == "bf16" else INT_TOL)  # two rounded activations in a row
    assert rel_rms(y, ref) <= bound
    assert rel_rms(ref, reference_routed_experts(x, idx, wts, w1, w3, w2, 1e9)) > 2 * bound  # the clamps matter
    assert torch.equal(routed_experts(x, idx, wts, w1, w3, w2, limit), y)


def test_routed_experts_same_for_any_thread_count():
    # each thread takes a contiguous share of the (pair, row) range, which may start or end inside a pair: every
    # row's dot is the same wherever the split falls, so the result is bit-identical for any thread count
    E, D, I, k, T = 5, 256, 96, 3, 2
    w1, w3 = make_weight(Q.Q8_0, (E, I, D), 1), make_weight(Q.Q4_K, (E, I, D), 2)
    w2 = make_weight(Q.MXFP4, (E, D, I), 3)
    x, wts = torch.randn(T, D) * 0.05, torch.rand(T, k)
    idx = torch.tensor([[0, 3, 4], [2, 3, 1]])
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3, 7):
            torch.set_num_threads(n)
            outs.append(fast.cpu_routed_experts(x, idx, wts, w1, w3, w2, 6.0))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_routed_experts_rejects_bad_ids():
    w1 = make_weight(Q.Q8_0, (2, 64, 64))
    w2 = make_weight(Q.Q8_0, (2, 64, 64))
    with pytest.raises(BadInput):
        fast.cpu_routed_experts(torch.randn(1, 64), torch.tensor([[0, 2]]), torch.ones(1, 2), w1, w1, w2, 10.0)


@pytest.mark.parametrize("chunk", [8, 1])
def test_engine_with_fast_kernels_tracks_reference(tiny_gguf, monkeypatch, chunk):
    # The product path end to end: 8-row chunks take the int8 GEMM and the row kernels (decode MoE included), one
    # token at a time the fused block halves (kernels/cpu/decode.cpp) at every step. int8 activations perturb every
    # matmul by ~0.5 %; on random weights that is amplified by flipped routing/top-k choices, so the yardstick is
    # Q8_0 weight rounding itself: activation rounding must cost no more than ~3x what storing the weights as Q8_0
    # costs (measured at chunk 8: 0.0032 vs 0.0023 nats).
    from v4cli.engine import Engine, SamplingParams, TokenRecord
    from v4cli.testing.tiny import random_token_ids

    def kl(ref, cand):
        p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(cand.double(), -1)
        return (p.exp() * (p - q)).sum(-1).mean().item()

    ids = random_token_ids(48, seed=3)
    lossless, q8 = Engine.load(tiny_gguf("lossless"), kv_format="f32"), Engine.load(tiny_gguf("q8"), kv_format="f32")
    fast_logits = lossless.logits(ids, chunk=chunk)
    backends.load(reference=True)
    ref_logits = lossless.logits(ids, chunk=chunk)
    q8_cost = kl(ref_logits, q8.logits(ids, chunk=chunk))
    assert 0 < kl(ref_logits, fast_logits) <= 3 * q8_cost
    backends.load(reference=False)
    recs = list(q8.generate(ids, SamplingParams(temperature=0.0, max_tokens=5, stop_on_eos=False)))
    assert sum(isinstance(r, TokenRecord) for r in recs) == 5


@pytest.mark.parametrize("M", [1, 3])
def test_linear_many_equals_separate_calls(M):
    # one batched call: inputs shared by several weights, a strided group view, mixed types (int8 and float paths)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 512, generator=g)
    groups = torch.randn(M, 4, 256, generator=g)
    ws = [make_weight(Q.Q8_0, (40, 512), 1), make_weight(Q.MXFP4, (24, 512), 2), make_weight(Q.BF16, (8, 512), 3),
          make_weight(Q.Q4_K, (16, 256), 4), make_weight(Q.Q8_0, (33, 256), 5)]
    pairs = [(x, ws[0]), (x, ws[1]), (x, ws[2]), (groups[:, 1], ws[3]), (groups[:, 3], ws[4])]
    got = linear_many(pairs)
    assert len(got) == len(pairs)
    for y, (xi, w) in zip(got, pairs):
        assert y.shape == (M, w.shape[0])
        assert torch.equal(y, fast.cpu_linear(xi, w))  # same quantized inputs, same row kernels: bit-identical


def test_linear_many_declines_gemm_sizes_and_mismatched_rows():
    w = make_weight(Q.Q8_0, (16, 256))
    big = torch.randn(fast.QGEMM_MIN_ROWS, 256)
    assert fast.cpu_linear_many([(big, w)]) is None
    assert fast.cpu_linear_many([(big[:1], w), (big[:2], w)]) is None
    ys = linear_many([(big, w), (big[:2], w)])  # the dispatcher falls back to one call each
    assert torch.equal(ys[0], fast.cpu_linear(big, w)) and torch.equal(ys[1], fast.cpu_linear(big[:2], w))


# ------------------------------------------------------------------------------------------- indexer scores
@pytest.mark.parametrize("H,d,N", [(64, 128, 3000), (8, 128, 1), (24, 36, 77), (64, 128, 0)])
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_index_scores_match_reference(H, d, N, key_dtype):
    from kernels import attention

    g = torch.Generator().manual_seed(H + d + N)
    q, w = torch.randn(1, H, d, generator=g), torch.randn(1, H, generator=g)
    keys = torch.randn(N, d, generator=g).to(key_dtype)
    got = fast.cpu_index_scores(q, w, keys, d ** -0.5)
    ref = attention.reference_index_scores(q, w, keys, d ** -0.5)
    assert got is not None and got.shape == (1, N)
    # the same f32 products (bf16 keys widened exactly); only the order of the sums differs
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * (ref.abs().max().item() if N else 1.0))
    assert torch.equal(attention.index_scores(q, w, keys, d ** -0.5), got)  # the dispatcher takes the kernel


def test_index_scores_decline_and_fall_back():
    from kernels import attention

    q, w, keys = torch.randn(2, 8, 32), torch.randn(2, 8), torch.randn(10, 32)
    assert fast.cpu_index_scores(q, w, keys, 1.0) is None  # a chunk of queries: the reference's batched matmuls
    assert fast.cpu_index_scores(torch.randn(1, 12, 32), torch.randn(1, 12), keys, 1.0) is None  # 12 heads
    assert fast.cpu_index_scores(q[:1], w[:1], keys.double(), 1.0) is None
    torch.testing.assert_close(attention.index_scores(q, w, keys, 0.5), attention.reference_index_scores(q, w, keys, 0.5),
                               rtol=0, atol=0)

