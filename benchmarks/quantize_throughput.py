"""Quantize throughput and peak RSS: our converter vs llama.cpp's quantizer on the same mini-Flash input.

Builds a mini-Flash checkpoint (true Flash per-layer dims, few layers/experts) in the official layout, then for
each recipe runs, in a fresh subprocess each (so peak RSS is per run): ours (official safetensors → GGUF) and
llama.cpp's `llama_model_quantize` (our lossless BF16/MXFP4 GGUF → the matching llama.cpp ftype). Prints MB/s of
input, seconds and peak RSS side by side, medians over --repeat runs.

    python benchmarks/quantize_throughput.py --layers 2 --experts 8 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# our recipe → llama.cpp ftype (llama.h LLAMA_FTYPE_MOSTLY_*): the closest whole-file equivalent
LLAMA_FTYPES = {"q8": 7, "q3k": 12, "q2k": 10}

_OURS = textwrap.dedent("""
    import json, sys, time
    from quant.convert import convert
    from quant.recipes import get_recipe
    t = time.perf_counter()
    r = convert(sys.argv[1], sys.argv[2], get_recipe(sys.argv[3]))
    print(json.dumps({"s": time.perf_counter() - t, "in": r.in_bytes, "out": r.out_bytes,
                      "rss": peak_rss()}))
""")
_LLAMA = textwrap.dedent("""
    import ctypes, json, os, sys, time
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = int(sys.argv[3]); p.allow_requantize = True; p.nthread = int(sys.argv[4])
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
    assert rc == 0, rc
    print(json.dumps({"s": time.perf_counter() - t, "out": os.path.getsize(sys.argv[2]),
                      "rss": peak_rss()}))
""")
# VmHWM, not ru_maxrss: on Linux a child inherits its parent's ru_maxrss across fork/exec, so it would report
# the benchmark driver's peak (which built the checkpoint in memory) instead of its own.
# RssAnon is sampled too: VmHWM includes the shards' mmap'd pages, which are file-backed and reclaimable.
_PEAK = textwrap.dedent("""
    import threading, time as _t
    def _status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0
    _anon = [0]
    def _sample():
        while True:
            _anon[0] = max(_anon[0], _status("RssAnon:"))
            _t.sleep(0.05)
    threading.Thread(target=_sample, daemon=True).start()
    def peak_rss():
        return {"hwm": _status("VmHWM:"), "anon": max(_anon[0], _status("RssAnon:"))}
""")


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PEAK + code, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--recipes", default="q8,q3k,q2k")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "v4-bench-quantize")
    a = ap.parse_args()

    from quant.convert import convert
    from quant.recipes import get_recipe
    from v4cli.testing.tiny import make_tiny_checkpoint

    ratios = ([0, 4, 128, 4, 128] * 9)[: a.layers] + [0]
    ckpt = make_tiny_checkpoint(a.work / "ckpt", preset="mini-flash", num_hidden_layers=a.layers,
                                n_routed_experts=a.experts, compress_ratios=ratios)
    lossless = a.work / "lossless.gguf"
    if not lossless.exists():
        convert(ckpt, lossless, get_recipe("lossless"))
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
    print(f"mini-Flash: {a.layers} layers, {a.experts} experts, Flash per-layer dims; threads={a.threads}")
    print(f"{'recipe':8} {'ours MB/s':>10} {'ours s':>8} {'ours RSS':>9} {'ours anon':>10} {'llama MB/s':>11} "
          f"{'llama s':>8} {'llama RSS':>10} {'llama anon':>11} {'ours/llama':>11}")
    for recipe in a.recipes.split(","):
        ours = [_run(_OURS, ckpt, a.work / f"ours-{recipe}.gguf", recipe) for _ in range(a.repeat)]
        in_mb = ours[0]["in"] / 1e6
        o_s = statistics.median(r["s"] for r in ours)
        o_rss = max(r["rss"]["hwm"] for r in ours) / 1e9
        o_anon = max(r["rss"]["anon"] for r in ours) / 1e9
        line = f"{recipe:8} {in_mb / o_s:10.1f} {o_s:8.1f} {o_rss:8.2f}G {o_anon:9.2f}G"
        if have_llama and recipe in LLAMA_FTYPES:
            ll = [_run(_LLAMA, lossless, a.work / f"llama-{recipe}.gguf", LLAMA_FTYPES[recipe], a.threads)
                  for _ in range(a.repeat)]
            l_s = statistics.median(r["s"] for r in ll)
            l_rss = max(r["rss"]["hwm"] for r in ll) / 1e9
            l_anon = max(r["rss"]["anon"] for r in ll) / 1e9
            line += f" {in_mb / l_s:11.1f} {l_s:8.1f} {l_rss:9.2f}G {l_anon:10.2f}G {l_s / o_s:10.2f}×"
        print(line, flush=True)
    print("MB/s = MB of official input (FP8/FP4/BF16 safetensors bytes) per second; RSS = peak resident set "
          "(VmHWM, includes reclaimable mmap'd input pages); anon = peak anonymous memory (sampled).")
    print("llama.cpp quantizes our lossless GGUF (same weights) with allow_requantize; its ftype mixes differ.")


if __name__ == "__main__":
    main()
