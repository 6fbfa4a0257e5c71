"""Routed experts in host memory (hybrid placement, kernels/offload.py): what each way costs for a prefill chunk.

    python benchmarks/expert_stream_bench.py [--type Q4_K] [--experts 64] [--tokens 64,512,2048] [--repeats 3]

E experts of Flash's shape (gate/up 2048×4096, down 4096×2048) stored as TYPE in host memory; T tokens routed
top-6 among them (a 256-expert layer at T·E/256 tokens: at E = 64 and T = 2048 every expert has ~190 tokens, as
in a 8K-token chunk of full Flash). For each T:
- host: the CPU's grouped products (the tokens go to the experts), and the rate per thread this implies against the
  cost model's assumed HOST_FLOPS_PER_THREAD;
- with a CUDA GPU: stream, end to end (staging into pinned buffers, the transfer, the GPU's products), as expert
  GB/s and as % of the measured pinned host-to-device copy rate (the link, against the assumed LINK_BYTES_PER_S),
  and the GPU's products over resident experts alone;
- which way `offload.choose` picks, and which was faster.
Medians over --repeats; random weight bytes (speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from kernels import backends, offload
from kernels.linear import QWeight, grouped_experts

I, D, K = 2048, 4096, 6  # Flash: expert width, hidden size, experts per token
LIMIT = 10.0


def stack(qtype: Q, E: int, out: int, inp: int, seed: int) -> QWeight:
    block, size = GGML_QUANT_SIZES[qtype]
    g = torch.Generator().manual_seed(seed)
    return QWeight(torch.randint(0, 256, (E * out * inp // block * size,), dtype=torch.uint8, generator=g), qtype,
                   (E, out, inp))


def median_s(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm up (kernel builds, Triton compiles, staging buffers)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def link_rate(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Pinned host → device copy, bytes/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / median_s(lambda: dst.copy_(src, non_blocking=True), repeats, torch.cuda.synchronize)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="Q4_K", help="ggml type of the experts (Q8_0, MXFP4, Q4_K, Q3_K, Q2_K)")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--tokens", default="64,512,2048", help="chunk sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    qtype, E = Q[a.type], a.experts
    backends.load()
    ws = (stack(qtype, E, I, D, 1), stack(qtype, E, I, D, 2), stack(qtype, E, D, I, 3))
    layer_bytes = E * offload.expert_bytes(ws)
    threads = torch.get_num_threads()
    cuda = torch.cuda.is_available()
    print(f"{E} experts {I}x{D} {a.type} in host memory ({layer_bytes / 1e9:.2f} GB), {threads} CPU threads; "
          f"assumed: {offload.HOST_FLOPS_PER_THREAD / 1e9:.0f} GFLOP/s per thread, "
          f"link {offload.LINK_BYTES_PER_S / 1e9:.0f} GB/s")
    if cuda:
        link = link_rate()
        resident = tuple(w.to("cuda") for w in ws)
        print(f"GPU {torch.cuda.get_device_name()}: pinned host->device {link / 1e9:.1f} GB/s measured")
    else:
        print("no CUDA GPU: host figures only")
    head = f"{'T':>6} {'choose':>7} {'host s':>8} {'GFLOP/s/thr':>11}"
    if cuda:
        head += f" {'stream s':>9} {'GB/s':>6} {'% link':>7} {'gpu-only s':>10} {'faster':>7}"
    print(head)
    for T in (int(t) for t in a.tokens.split(",")):
        g = torch.Generator().manual_seed(T)
        x = torch.randn(T, D, generator=g)
        idx = torch.rand(T, E, generator=g).topk(min(K, E), dim=1).indices
        wts = torch.rand(idx.shape, generator=g)
        host = median_s(lambda: grouped_experts(x, idx, wts, *ws, LIMIT), a.repeats)
        rate = T * idx.shape[1] * 3 * 2 * I * D / host / threads
        line = f"{T:>6} {offload.choose(idx.numel(), ws):>7} {host:>8.3f} {rate / 1e9:>11.1f}"
        if cuda:
            xg, ig, wg = x.cuda(), idx.cuda(), wts.cuda()
            stream = median_s(lambda: grouped_experts(
                xg, ig, wg, *ws, LIMIT, lambda counts: offload.stream_experts(counts, ws, xg.device)),
                a.repeats, torch.cuda.synchronize)
            active = int((torch.bincount(idx.reshape(-1), minlength=E) > 0).sum()) * offload.expert_bytes(ws)
            gpu_only = median_s(lambda: grouped_experts(xg, ig, wg, *resident, LIMIT), a.repeats,
                                torch.cuda.synchronize)
            line += (f" {stream:>9.3f} {active / stream / 1e9:>6.1f} {100 * active / stream / link:>6.0f}%"
                     f" {gpu_only:>10.3f} {'stream' if stream < host else 'host':>7}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
