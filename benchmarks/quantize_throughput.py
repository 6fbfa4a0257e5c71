"""Quantize throughput and peak memory: our converter vs llama.cpp's quantizer on the same mini-Flash input.

Builds a mini-Flash checkpoint (true Flash per-layer dims, few layers/experts) in the official layout and its
lossless GGUF, and an importance matrix of it (our engine over the built-in calibration text). Then for each recipe,
in a fresh subprocess each: ours (official safetensors → GGUF, `--threads` quantizing processes, guided by the
imatrix) and llama.cpp's `llama_model_quantize` on `--threads` threads (our lossless GGUF → exactly our file's
per-tensor types, with the same importance values). Prints MB/s of input, seconds and peak memory side by side,
medians over --repeat runs.

    python benchmarks/quantize_throughput.py --layers 2 --experts 8 --recipes iq2-80,q2k --repeat 1
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

_OURS = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from quant.convert import convert
    from quant.imatrix import load_imatrix
    from quant.recipes import get_recipe
    im = load_imatrix(Path(sys.argv[4])) if sys.argv[4] != "-" else None
    t = time.perf_counter()
    r = convert(sys.argv[1], sys.argv[2], get_recipe(sys.argv[3]), imatrix=im, workers=int(sys.argv[5]))
    print(json.dumps({"s": time.perf_counter() - t, "in": r.in_bytes, "out": r.out_bytes,
                      "rss": peak_rss()}))
""")
# llama.cpp's quantizer in this process (not the wrapper's child), to the layout of our file (argv[3])
_LLAMA = textwrap.dedent("""
    import json, os, sys, tempfile, time
    from pathlib import Path
    import numpy as np
    from quant.imatrix import load_imatrix
    from v4cli.testing.wild import FTYPES, _quantize_child, same_layout
    im = load_imatrix(Path(sys.argv[4])) if sys.argv[4] != "-" else None
    overrides, imatrix = same_layout(Path(sys.argv[3]), im)
    with tempfile.TemporaryDirectory() as tmp:
        npz = None
        if imatrix is not None:
            npz = os.path.join(tmp, "im.npz")
            np.savez(npz, **imatrix)
        t = time.perf_counter()
        rc = _quantize_child({"src": sys.argv[1], "dst": sys.argv[2], "ftype": FTYPES["Q8_0"][0], "imatrix": npz,
                              "overrides": overrides, "threads": int(sys.argv[5])})
        s = time.perf_counter() - t
    assert rc == 0, rc
    print(json.dumps({"s": s, "out": os.path.getsize(sys.argv[2]), "rss": peak_rss()}))
""")
# Sampled sums over the process and its children (our quantizing processes): peak RSS (includes the shards'
# mmap'd pages, file-backed and reclaimable) and peak anonymous memory (what the work itself holds). Not ru_maxrss:
# a child inherits its parent's across fork/exec, and it would miss the worker processes.
_PEAK = textwrap.dedent("""
    import threading, time as _t
    import psutil
    _me = psutil.Process()
    _peak = {"rss": 0, "anon": 0}
    def _now():
        rss = anon = 0
        for p in [_me, *_me.children(recursive=True)]:
            try:
                m = p.memory_full_info()
            except psutil.Error:
                continue
            rss += m.rss
            anon += m.rss - m.shared
        return rss, anon
    def _sample():
        while True:
            rss, anon = _now()
            _peak["rss"], _peak["anon"] = max(_peak["rss"], rss), max(_peak["anon"], anon)
            _t.sleep(0.05)
    threading.Thread(target=_sample, daemon=True).start()
    def peak_rss():
        return {"hwm": _peak["rss"], "anon": _peak["anon"]}
""")


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PEAK + code, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--recipes", default="q8,q2k,iq2-80,iq3-108")
    ap.add_argument("--imatrix-chunks", type=int, default=8, help="chunks of 128 tokens for the importance matrix")
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
    im_path = a.work / f"imatrix-{a.imatrix_chunks}.gguf"
    if not im_path.exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's benchmarks
        from benchmarks.recipe_quality import make_imatrix

        make_imatrix(lossless, im_path, 128, a.imatrix_chunks)
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
    print(f"mini-Flash: {a.layers} layers, {a.experts} experts, Flash per-layer dims; threads={a.threads}")
    print(f"{'recipe':8} {'ours MB/s':>10} {'ours s':>8} {'ours RSS':>9} {'ours anon':>10} {'llama MB/s':>11} "
          f"{'llama s':>8} {'llama RSS':>10} {'llama anon':>11} {'ours/llama':>11}")
    for recipe in a.recipes.split(","):
        guided = recipe not in ("lossless", "q8", "f32")
        im_arg = im_path if guided else "-"
        ours = [_run(_OURS, ckpt, a.work / f"ours-{recipe}.gguf", recipe, im_arg, a.threads) for _ in range(a.repeat)]
        in_mb = ours[0]["in"] / 1e6
        o_s = statistics.median(r["s"] for r in ours)
        o_rss = max(r["rss"]["hwm"] for r in ours) / 1e9
        o_anon = max(r["rss"]["anon"] for r in ours) / 1e9
        line = f"{recipe:8} {in_mb / o_s:10.1f} {o_s:8.1f} {o_rss:8.2f}G {o_anon:9.2f}G"
        if have_llama:
            ll = [_run(_LLAMA, lossless, a.work / f"llama-{recipe}.gguf", a.work / f"ours-{recipe}.gguf", im_arg,
                       a.threads) for _ in range(a.repeat)]
            l_s = statistics.median(r["s"] for r in ll)
            l_rss = max(r["rss"]["hwm"] for r in ll) / 1e9
            l_anon = max(r["rss"]["anon"] for r in ll) / 1e9
            line += f" {in_mb / l_s:11.1f} {l_s:8.1f} {l_rss:9.2f}G {l_anon:10.2f}G {l_s / o_s:10.2f}×"
        print(line, flush=True)
    print("MB/s = MB of official input (FP8/FP4/BF16 safetensors bytes) per second; RSS = peak resident set of the "
          "process and its children (includes reclaimable mmap'd input pages); anon = peak of the part not shared "
          "with files (sampled every 50 ms).")
    print("llama.cpp requantizes our lossless GGUF (the same weights) to exactly our file's tensor types, with the "
          f"same importance values ({a.imatrix_chunks} chunks of 128 tokens), on {a.threads} threads; ours runs "
          f"{a.threads} quantizing processes.")


if __name__ == "__main__":
    main()
