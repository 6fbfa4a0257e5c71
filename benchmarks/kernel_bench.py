"""CPU matvec bandwidth: our fused kernels vs the torch reference vs llama.cpp's own vec_dot, as % of memory bandwidth.

    python benchmarks/kernel_bench.py [--types Q4_K,MXFP4] [--reps 20] [--threads 1] [--no-llama] [--prefill]

Weights are random bytes of the right size (speed does not depend on the values, except the scales: MXFP4's
exponents are kept near 1 and the f16 scales of the other block types set to small normal values, so that no
scale is NaN or subnormal, which would measure the FP assists instead). Each timed call reads a different copy out of a pool larger
than the last-level cache, so every figure is a DRAM figure. Times are the
minimum over repetitions (robust to other load on a shared machine). GB/s counts weight bytes read per second.
The llama.cpp column runs ggml's vec_dot for the type (from the libggml-cpu shipped in llama_cpp) row by row
under OpenMP with the same thread count, after quantizing x with ggml's own from_float, which is what ggml's
mul_mat does for one token.

--prefill times y = x·Wᵀ for M activation rows (Flash expert shape 2048×4096) in GOP/s (2·M·N·K per second):
our fused row kernels, our int8 GEMM, the tiled dequantize + f32 GEMM, and ggml's own mul_mat (a one-node ggml
graph run with ggml_graph_compute_with_ctx and the same thread count; weights in their GGUF layout, i.e. without
llama.cpp's load-time repacking of some types).
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from kernels import backends, fast
from kernels.linear import QWeight, reference_linear

# Flash shapes: (name, out N, in K)
SHAPES = (("expert w1/w3 4096→2048", 2048, 4096), ("expert w2 2048→4096", 4096, 2048), ("q_a 4096→1024", 1024, 4096))
TYPES = ("Q8_0", "Q4_K", "Q2_K", "Q3_K", "Q6_K", "MXFP4", "BF16", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS",
         "IQ2_S", "IQ1_M", "IQ1_S")
# Byte offsets of each block type's f16 scales (IQ1_M spreads its one over the top nibbles of bytes 48-55).
F16_SCALES = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q5_0: (0,), Q.IQ4_NL: (0,), Q.Q2_K: (80, 82), Q.Q3_K: (108,),
              Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ2_XXS: (0,), Q.IQ2_XS: (0,), Q.IQ2_S: (0,),
              Q.IQ3_XXS: (0,), Q.IQ3_S: (0,), Q.IQ1_S: (0,), Q.IQ4_XS: (0,)}
POOL_BYTES = 512 << 20

_HELPER = r"""
#include <stdint.h>
#include <stddef.h>
typedef void (*vec_dot_t)(int, float*, size_t, const void*, size_t, const void*, size_t, int);
void matvec(vec_dot_t vd, int n, const uint8_t* W, int64_t rb, int64_t N, const void* xq, float* y, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < N; ++r) vd(n, y + r, 0, W + r * rb, 0, xq, 0, 1);
}
"""


class GgmlInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class TypeTraitsCpu(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


class Ggml:
    """ggml's CPU vec_dot through ctypes, plus a tiny OpenMP row loop compiled here."""

    def __init__(self):
        import llama_cpp

        libdir = Path(llama_cpp.__file__).parent / "lib"
        ctypes.CDLL(str(libdir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        self.cpu = ctypes.CDLL(str(libdir / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        self.cpu.ggml_cpu_init()
        self.cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(TypeTraitsCpu)
        self.base = ctypes.CDLL(str(libdir / "libggml-base.so"))
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        for name, res, args in (("ggml_init", vp, [GgmlInitParams]), ("ggml_free", None, [vp]),
                                ("ggml_new_tensor_2d", vp, [vp, ctypes.c_int, i64, i64]),
                                ("ggml_mul_mat", vp, [vp, vp, vp]), ("ggml_new_graph", vp, [vp]),
                                ("ggml_build_forward_expand", None, [vp, vp]), ("ggml_get_data", vp, [vp])):
            fn = getattr(self.base, name)
            fn.restype, fn.argtypes = res, args
        self.cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
        self.cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
        tmp = Path(tempfile.mkdtemp())
        (tmp / "h.c").write_text(_HELPER)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-fopenmp", str(tmp / "h.c"), "-o", str(tmp / "h.so")],
                       check=True)
        self.helper = ctypes.CDLL(str(tmp / "h.so"))
        self._contexts: list[int] = []
        self.helper.matvec.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]

    def prepare(self, qtype: Q, x: torch.Tensor):
        """Quantize x into the type's vec_dot_type with ggml's from_float; return (vec_dot, x buffer)."""
        tr = self.cpu.ggml_get_type_traits_cpu(int(qtype)).contents
        dt = Q(tr.vec_dot_type)
        bs, ts = GGML_QUANT_SIZES[dt]
        buf = torch.empty(x.shape[-1] // bs * ts, dtype=torch.uint8)
        if dt == Q.F32:
            buf = x.reshape(-1).clone().view(torch.uint8)
        else:
            dtr = self.cpu.ggml_get_type_traits_cpu(int(dt)).contents
            ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(dtr.from_float)(
                x.data_ptr(), buf.data_ptr(), x.shape[-1])
        return tr.vec_dot, buf

    def mul_mat(self, w: QWeight, x: torch.Tensor):
        """A callable computing ggml_mul_mat(W, x) (ggml quantizes x itself) in a context of its own."""
        N, K = w.shape
        M = x.shape[0]
        nbytes = w.raw.numel()
        ctx = self.base.ggml_init(GgmlInitParams(nbytes + 4 * M * (K + N) + (16 << 20), None, False))
        wt = self.base.ggml_new_tensor_2d(ctx, int(w.qtype), K, N)
        xt = self.base.ggml_new_tensor_2d(ctx, int(Q.F32), K, M)
        ctypes.memmove(self.base.ggml_get_data(wt), w.raw.data_ptr(), nbytes)
        ctypes.memmove(self.base.ggml_get_data(xt), x.contiguous().data_ptr(), 4 * M * K)
        graph = self.base.ggml_new_graph(ctx)
        self.base.ggml_build_forward_expand(graph, self.base.ggml_mul_mat(ctx, wt, xt))  # (M, N)
        nt = torch.get_num_threads()

        def run():
            if self.cpu.ggml_graph_compute_with_ctx(ctx, graph, nt) != 0:
                raise RuntimeError("ggml_graph_compute failed")

        self._contexts.append(ctx)
        return run

    def free(self):
        for ctx in self._contexts:
            self.base.ggml_free(ctx)
        self._contexts.clear()

    def matvec(self, vd, xbuf, w: QWeight, y: torch.Tensor):
        N, K = w.shape
        self.helper.matvec(vd, K, w.raw.data_ptr(), w.row_bytes, N, xbuf.data_ptr(), y.data_ptr(),
                           torch.get_num_threads())


def best_time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def stream_bandwidth(reps: int) -> tuple[float, float]:
    """(read GB/s from a sum over 512 MB, copy GB/s counting read + write) with torch's threads."""
    a = torch.ones(POOL_BYTES // 4)
    b = torch.empty_like(a)
    read = a.numel() * 4 / best_time(lambda: a.sum(), reps) / 1e9
    copy = 2 * a.numel() * 4 / best_time(lambda: b.copy_(a), reps) / 1e9
    return read, copy


def weight_pool(qtype: Q, N: int, K: int, rng: np.random.Generator) -> list[QWeight]:
    bs, ts = GGML_QUANT_SIZES[qtype]
    nbytes = N * K // bs * ts
    copies = max(2, POOL_BYTES // nbytes)
    raw = torch.from_numpy(rng.integers(0, 256, size=copies * nbytes, dtype=np.uint8))
    if qtype in (Q.BF16, Q.F16):  # random bits would include NaN/Inf; keep values finite and small
        raw.view(torch.int16).bitwise_and_(0x3FFF if qtype == Q.BF16 else 0x3BFF)
    if qtype == Q.MXFP4:  # E8M0 exponents near 1 as in real checkpoints: random ones make subnormal scales, which
        raw.view(-1, ts)[:, 0].bitwise_and_(7).add_(120)  # cost both kernels FP assists and measure that instead
    blocks = raw.view(-1, ts)
    for off in F16_SCALES.get(qtype, ()):  # f16 exponent 8..15 (2^-7..1): normal, as real scales are
        blocks[:, off + 1].bitwise_and_(0x1F).bitwise_or_(0x20)
    if qtype == Q.IQ1_M:  # the f16's top nibble sits in byte 55's top nibble
        blocks[:, 55].bitwise_and_(0x1F).bitwise_or_(0x20)
    return [QWeight(raw[i * nbytes:(i + 1) * nbytes], qtype, (N, K)) for i in range(copies)]


def cycling(fn, pool):
    it = iter(())

    def call():
        nonlocal it
        w = next(it, None)
        if w is None:
            it = iter(pool)
            w = next(it)
        fn(w)

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch / kernel threads (default: torch's)")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--prefill", action="store_true",
                    help="also time M in {4..512}: fused vs int8 GEMM vs tiled f32 GEMM vs ggml's mul_mat")
    ap.add_argument("--moe", action="store_true", help="also time one decode token's routed experts (k=6, Flash)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not backends.load(reference=False)["kernels.fast"]:
        raise SystemExit("the CPU kernels did not build; nothing to benchmark")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    read, copy = stream_bandwidth(args.reps)
    bw = max(read, copy)
    print(f"threads {torch.get_num_threads()}  isa {fast._lib.v4_isa()}  "
          f"STREAM-like: read {read:.1f} GB/s, copy {copy:.1f} GB/s  (100% = {bw:.1f} GB/s)")
    ggml = None
    if not args.no_llama:
        try:
            ggml = Ggml()
        except (ImportError, OSError, subprocess.CalledProcessError) as e:
            print(f"llama.cpp column skipped: {e}")
    print(f"{'type':6} {'shape':24} {'ours GB/s':>10} {'%bw':>5} {'llama GB/s':>10} {'%bw':>5} {'ref GB/s':>9}  "
          f"{'ours us':>8} {'llama us':>8}")
    for name in args.types.split(","):
        qt = Q[name]
        for label, N, K in SHAPES:
            pool = weight_pool(qt, N, K, rng)
            nbytes = pool[0].raw.numel()
            x = torch.randn(1, K)
            t_ours = best_time(cycling(lambda w: fast.matvec(x, w), pool), args.reps)
            t_ref = best_time(cycling(lambda w: reference_linear(x, w), pool), max(2, args.reps // 10))
            t_ll = float("nan")
            if ggml is not None:
                vd, xbuf = ggml.prepare(qt, x)
                y = torch.empty(N)
                t_ll = best_time(cycling(lambda w: ggml.matvec(vd, xbuf, w, y), pool), args.reps)
            g_ours, g_ll, g_ref = nbytes / t_ours / 1e9, nbytes / t_ll / 1e9, nbytes / t_ref / 1e9
            print(f"{name:6} {label:24} {g_ours:10.1f} {100 * g_ours / bw:5.0f} {g_ll:10.1f} {100 * g_ll / bw:5.0f} "
                  f"{g_ref:9.2f}  {t_ours * 1e6:8.0f} {t_ll * 1e6:8.0f}")
        if args.moe:
            moe_decode(qt, args.reps, rng)
        if args.prefill:
            prefill(qt, ggml, rng)


def prefill(qtype: Q, ggml: Ggml | None, rng: np.random.Generator) -> None:
    """y = x·Wᵀ for M rows, Flash expert shape 2048×4096, GOP/s (ms): fused, int8 GEMM, tiled f32 GEMM, ggml."""
    N, K = 2048, 4096
    pool = weight_pool(qtype, N, K, rng)[:4]
    int8 = fast.has_qgemm(pool[0])
    print(f"  prefill {qtype.name} {N}x{K}, GOP/s (ms): {'fused':>16} {'int8 GEMM':>16} {'tiled f32 GEMM':>16} "
          f"{'ggml mul_mat':>16}")
    for M in (4, 8, 16, 32, 64, 128, 512):
        x = torch.randn(M, K)
        reps = 5 if M <= 128 else 3
        t_mv = best_time(cycling(lambda w: fast.matvec(x, w), pool), reps)
        t_q = best_time(cycling(lambda w: fast.qgemm(x, w), pool), reps) if int8 else float("nan")
        t_gm = best_time(cycling(lambda w: fast.tiled_gemm(x, w), pool), reps)
        t_ll = float("nan")
        if ggml is not None:
            runs = [ggml.mul_mat(w, x) for w in pool]
            t_ll = best_time(cycling(lambda run: run(), runs), reps)
            ggml.free()
        ops = 2 * M * N * K / 1e9
        cols = "".join(f" {ops / t:8.1f} ({t * 1e3:5.1f})" for t in (t_mv, t_q, t_gm, t_ll))
        print(f"  prefill {qtype.name:5} M={M:3}{'':16}{cols}", flush=True)


def moe_decode(qtype: Q, reps: int, rng: np.random.Generator) -> None:
    """One token, 6 of 16 Flash-shaped experts (D 4096, I 2048): fused routed_experts vs the gather+bmm reference."""
    from kernels.linear import reference_routed_experts

    E, D, I, k = 16, 4096, 2048, 6
    w1, w3, w2 = (weight_pool(qtype, E * a, b, rng)[0] for a, b in ((I, D), (I, D), (D, I)))
    w1, w3, w2 = (QWeight(w.raw, qtype, (E, *s)) for w, s in ((w1, (I, D)), (w3, (I, D)), (w2, (D, I))))
    x, wts = torch.randn(1, D) * 0.01, torch.rand(1, k)
    idx = torch.randperm(E)[:k].reshape(1, k)
    nbytes = 3 * k * w1.raw.numel() // E
    t_f = best_time(lambda: fast.cpu_routed_experts(x, idx, wts, w1, w3, w2, 10.0), reps)
    t_r = best_time(lambda: reference_routed_experts(x, idx, wts, w1, w3, w2, 10.0), max(2, reps // 10))
    print(f"  moe decode {qtype.name}: fused {t_f * 1e3:.2f} ms ({nbytes / t_f / 1e9:.1f} GB/s)  "
          f"reference {t_r * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
