"""GPU matvec bandwidth: the Triton fused kernels (kernels/gpu.py) vs the torch reference, as % of the GPU's copy rate.

    python benchmarks/gpu_kernel_bench.py [--types Q8_0,MXFP4] [--calls 200]

Weights are random bytes of the right size (speed does not depend on the values on a GPU). Each timed call reads
a different copy out of a pool 10× the L2 cache, so every figure is an HBM figure. A run of calls is captured in
one CUDA graph and replayed, so the GPU time is measured without Python's launch cost; the eager column times the
same calls launched from Python (what decode pays without graphs). GB/s counts weight bytes read per second; the
roofline is a device-to-device copy (bytes read + written per second). Medians over 5 replays.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from kernels import gpu
from kernels.linear import QWeight, reference_linear, reference_routed_experts

# Flash shapes: (name, out N, in K)
SHAPES = (("expert w1/w3 4096→2048", 2048, 4096), ("expert w2 2048→4096", 4096, 2048), ("q_a 4096→1024", 1024, 4096),
          ("head 4096→129280", 129280, 4096))
TYPES = ("Q8_0", "MXFP4", "Q4_K", "Q3_K", "Q2_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS",
         "IQ2_S", "IQ1_M", "BF16")


def gpu_time(fn, calls: int, graph: bool) -> float:
    """Median seconds per call of `fn(i)` for i in range(calls), replayed from a CUDA graph or launched eagerly."""
    for i in range(min(calls, 3)):
        fn(i)  # compile / warm up
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for i in range(min(calls, 3)):
                fn(i)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            for i in range(calls):
                fn(i)
        run = g.replay
    else:
        def run():
            for i in range(calls):
                fn(i)
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(times)


def copy_bandwidth() -> float:
    a = torch.ones(1 << 29, device="cuda")  # 2 GiB
    b = torch.empty_like(a)
    t = gpu_time(lambda i: b.copy_(a), 10, graph=False)
    return 2 * a.numel() * 4 / t / 1e9


def pool(qtype: Q, shape: tuple[int, ...], min_bytes: int) -> list[QWeight]:
    bs, ts = GGML_QUANT_SIZES[qtype]
    n = 1
    for s in shape:
        n *= s
    nbytes = n // bs * ts
    copies = max(2, -(-min_bytes // nbytes))
    raw = torch.randint(0, 256, (copies * nbytes,), dtype=torch.uint8, device="cuda")
    if qtype in (Q.BF16, Q.F16):  # finite, small values
        raw.view(torch.int16).bitwise_and_(0x3FFF if qtype == Q.BF16 else 0x3BFF)
    if qtype == Q.MXFP4:
        raw.view(-1, ts)[:, 0].bitwise_and_(7).add_(120)
    return [QWeight(raw[i * nbytes:(i + 1) * nbytes], qtype, shape) for i in range(copies)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    if not (torch.cuda.is_available() and gpu.available()):
        raise SystemExit("needs a CUDA GPU and Triton")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name(0)}: copy {bw:.0f} GB/s (read + write), L2 {l2 >> 20} MB")
    x = torch.randn(1, 129280, device="cuda")
    for name in a.types.split(","):
        qtype = Q[name]
        fn = gpu.gpu_linear_bf16 if qtype in (Q.BF16, Q.F16) else gpu.gpu_linear
        for label, N, K in SHAPES:
            ws = pool(qtype, (N, K), 10 * l2)
            xs = x[:, :K].contiguous()
            nbytes = ws[0].raw.numel()
            call = lambda i, fn=fn, xs=xs, ws=ws: fn(xs, ws[i % len(ws)])
            t_g = gpu_time(call, a.calls, graph=True)
            t_e = gpu_time(call, a.calls, graph=False)
            line = (f"  {name:7s} {label:24s} graph {t_g * 1e6:8.1f} µs {nbytes / t_g / 1e9:7.0f} GB/s "
                    f"({100 * nbytes / t_g / 1e9 / bw:3.0f} %)   eager {t_e * 1e6:8.1f} µs")
            if N <= 4096:
                t_r = gpu_time(lambda i, xs=xs, ws=ws: reference_linear(xs, ws[i % len(ws)]), 10, graph=False)
                line += f"   reference {t_r * 1e6:8.1f} µs ({t_r / t_g:.0f}× slower)"
            print(line, flush=True)
        if qtype in gpu.TYPES:
            moe(qtype, x, bw, a.calls)


def moe(qtype: Q, x: torch.Tensor, bw: float, calls: int) -> None:
    """One token's routed experts (k=6 of 256 Flash-shaped experts, D 4096, I 2048): gate+up+down, fused."""
    E, D, I, k = 256, 4096, 2048, 6
    w1, w3, w2 = (pool(qtype, s, 0)[0] for s in ((E, I, D), (E, I, D), (E, D, I)))
    xs, wts = x[:, :D].contiguous(), torch.rand(1, k, device="cuda")
    ids = [torch.randperm(E, device="cuda")[:k].view(1, k) for _ in range(64)]
    nbytes = 3 * k * w1.raw.numel() // E
    t_g = gpu_time(lambda i: gpu.gpu_routed_experts(xs, ids[i % 64], wts, w1, w3, w2, 10.0), calls, graph=True)
    t_e = gpu_time(lambda i: gpu.gpu_routed_experts(xs, ids[i % 64], wts, w1, w3, w2, 10.0), calls, graph=False)
    t_r = gpu_time(lambda i: reference_routed_experts(xs, ids[i % 64], wts, w1, w3, w2, 10.0), 10, graph=False)
    print(f"  {qtype.name:7s} moe decode k=6 of 256     graph {t_g * 1e6:8.1f} µs {nbytes / t_g / 1e9:7.0f} GB/s "
          f"({100 * nbytes / t_g / 1e9 / bw:3.0f} %)   eager {t_e * 1e6:8.1f} µs   reference {t_r * 1e6:8.1f} µs",
          flush=True)


if __name__ == "__main__":
    main()
