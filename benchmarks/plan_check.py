"""The plan checked against reality: memory, bytes read per decoded token, and the bandwidth meter's bound.

On a mini-Flash GGUF (true Flash per-layer dims, few layers and experts; built once under --work, as
benchmarks/engine_bench.py builds it), for each context a fresh subprocess measures:

1. Memory. RSS (/proc/self/status: RssFile and RssAnon, after glibc's malloc_trim) before load, after load (the
   loader maps the file's pages in up front) and after the model's cache holds N tokens; beside it the cache's
   own count (`ModelCache.nbytes()`, what the engine's DoneRecord.memory.kv_bytes reports) and the bytes its
   tensors have allocated. Compared with what the planner predicts for the weights in RAM, the KV cache (windows,
   compressed entries, indexer keys) and the compressors' partial-window state. The cache is filled by a real
   chunked prefill up to --prefill-max tokens; longer contexts are filled through the cache's own storage path
   (`Rows.append` / `keep_last` with random rows, in the row counts a 256-token prefill chunk appends, and the
   compressor buffers in the shapes `Compressor.update` leaves), so the cache holds and allocates what a real
   run's does (tests/test_plan_check.py checks that against a real prefill). Each row says which fill it used.
2. Bytes read per token. One decode step with every weight product counted from the kernels' inputs (the QWeights
   passed to linear / linear_many / routed_experts: only the selected experts' slices / embedding: only the rows),
   the small f32 tensors the model holds (norms, mHC mixers, router, sinks, ape), and the KV rows attention
   decodes from the cache (window, HCA entries, indexer keys, the top-k CSA entries) plus the compressor buffers.
   The fused one-token kernels are switched off for that step (they read the same weights, unseen).
3. The meter's bound: decode tok/s at context 0 (median per-token gap) × planned bytes per token, as a % of the
   bandwidth meter's figure; it must be ≤ 100 %.

    python benchmarks/plan_check.py --layers 4 --experts 16 --contexts 512,4096,32768,131072 --kv bf16,fp8

Exits non-zero when any memory row misses its plan by more than 10 %, or the bound is over 100 %.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOLERANCE = 0.10  # memory rows: |measured / planned - 1| at most this
CHUNK = 256  # prefill chunk (the engine's DEFAULT_CHUNK): the row counts each append adds
_RESULT = "PLANCHECK "  # prefix of the worker's result line on its stdout


# ------------------------------------------------------------------------------------------ the planner adapter
# The only code that knows the planner's API: what it predicts for one file, context and KV format.


@dataclass
class Planned:
    weights_ram: int  # weight bytes placed in RAM
    kv: int  # windows + compressed entries + indexer keys
    state: int  # compressors' partial-window state
    read: dict[str, float]  # bytes read per decoded token: dense, experts, embedding, kv (rows), state


def planned(gguf: Path, ctx: int, kv_format: str) -> Planned:
    from quant import names as N
    from v4cli.model.kvsize import compressor_state_bytes
    from v4cli.planning.machine import RAM, Machine
    from v4cli.planning.plan import KV, plan_at
    from v4cli.planning.tensors import Inventory
    from v4cli.planning.traffic import kv_read_by_layer

    inv = Inventory.from_gguf(gguf)
    p = plan_at(inv, Machine(ram=1 << 50), ctx, kv_format)  # RAM to spare: every weight is placed in RAM
    assert p.where[KV] == RAM
    state = compressor_state_bytes(inv.args, ctx)
    read = {"dense": 0.0, "experts": 0.0, "embedding": 0.0}
    for w in inv.tensors:
        key = "experts" if w.role == N.EXPS else "embedding" if w.role in (N.EMBED, N.TID2EID) else "dense"
        read[key] += w.read
    # the planner's bytes-per-token model at the step measured: the token decoded after `ctx` tokens
    read["kv"] = float(sum(kv_read_by_layer(inv.args, kv_format, ctx).values()))
    read["state"] = float(state)
    return Planned(p.used(RAM) - p.kv_bytes, p.kv_bytes - state, state, read)


def meter(threads: int) -> dict[str, float]:
    """The bandwidth meter the planner's decode bound uses (GB/s), and which figure of it is the bound."""
    from v4cli.planning.machine import measure_bandwidth

    m = measure_bandwidth("cpu", threads=threads)
    return {"name": "v4cli.planning.machine.measure_bandwidth (bound)", "gbs": m["bound_gbs"],
            **{k: m[k] for k in ("read_gbs", "copy_gbs", "triad_gbs") if k in m}}


# ------------------------------------------------------------------------------------------------ measuring


def rss() -> dict[str, int]:
    """This process's resident memory (bytes) after handing freed heap back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed activations would otherwise count as live memory
    except OSError:
        pass
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0]) * 1024
    return out


def fill_prefill(model, cache, n: int, seed: int = 0) -> None:
    """A real prefill of n random tokens in CHUNK-token chunks, as Engine.prefill runs it."""
    import torch

    from v4cli.testing.tiny import random_token_ids

    ids = torch.tensor(random_token_ids(n, seed=seed, vocab=min(model.args.vocab_size, 128000)))
    with torch.inference_mode():
        for i in range(0, n, CHUNK):
            model.forward(ids[i: i + CHUNK], cache, last_only=True)


def fill_append(model, cache, n: int, seed: int = 0) -> None:
    """The cache after n tokens of a CHUNK-chunked prefill, through its own storage path with random rows: each
    chunk appends its window rows then keeps the last window_len (Attention.attend), and each compressor the
    entries its complete windows make (Compressor.update); the partial-window buffers end in update's shapes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for lc in cache.layers:
        states = [s for s in (lc.compressor, lc.indexer) if s is not None]
        for start in range(0, n, CHUNK):
            t = min(CHUNK, n - start)
            lc.window.append(torch.randn(t, lc.window.dim, generator=g))
            lc.window.keep_last(lc.window_len)
            for st in states:
                done = (start + t) // st.ratio - st.count  # windows this chunk completes
                if done:
                    st.entries.append(torch.randn(done, st.entries.dim, generator=g))
                    st.count += done
        for st in states:
            overlap = st.ratio == 4  # as Compressor: CSA windows overlap, their projections are 2·dim wide
            width = 2 * st.entries.dim if overlap else st.entries.dim
            rest = n % st.ratio
            st.buf_kv, st.buf_score = torch.randn(rest, width, generator=g), torch.randn(rest, width, generator=g)
            if overlap and st.count:
                st.prev_kv = torch.randn(st.ratio, st.entries.dim, generator=g)
                st.prev_score = torch.randn(st.ratio, st.entries.dim, generator=g)
    cache.pos = n


_STATE_TENSORS = ("buf_kv", "buf_score", "prev_kv", "prev_score")


def cache_bytes(cache) -> dict[str, int]:
    """The cache's bytes: held rows (its own count) and allocated storage, for the KV rows and the compressor
    buffers separately."""
    seen: set[int] = set()

    def alloc(t) -> int:
        if t is None or not t.dim():
            return 0
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            return 0
        seen.add(s.data_ptr())
        return s.nbytes()

    kv_held = kv_alloc = st_held = st_alloc = 0
    for lc in cache.layers:
        rows = [lc.window] + [p.entries for p in lc.parts().values()]
        kv_held += sum(r.nbytes() for r in rows)
        kv_alloc += sum(alloc(v) for r in rows for v in r.parts.values())
        for p in lc.parts().values():
            ts = [getattr(p, k) for k in _STATE_TENSORS]
            st_held += sum(t.numel() * t.element_size() for t in ts if t is not None)
            st_alloc += sum(alloc(t) for t in ts)
    assert kv_held + st_held == cache.nbytes()
    return {"kv_held": kv_held, "kv_alloc": kv_alloc, "state_held": st_held, "state_alloc": st_alloc,
            "nbytes": cache.nbytes()}


def _held_f32(model) -> list:
    """The small tensors the model read once as f32 and uses every token: norms, mHC mixers, router, sinks, ape."""
    ts = [model.norm, model.head_mix.fn, model.head_mix.scale, model.head_mix.base]
    for b in model.blocks:
        at, moe = b.attn, b.moe
        ts += [b.attn_norm, b.ffn_norm, at.q_norm, at.kv_norm, at.sink, moe.gate]
        for p in (b.attn_hc.p, b.ffn_hc.p):
            ts += [p.fn, p.scale, p.base]
        if not moe.hash:
            ts.append(moe.bias)
        for c in (at.compressor, at.indexer.compressor if at.indexer else None):
            if c is not None:
                ts += [c.ape, c.norm]
    return ts


def count_decode_step(model, cache) -> dict[str, float]:
    """Bytes one decode step reads, counted from what the kernels and attention are handed (advances the cache).

    Weight products through the kernels' `observing` hook (the fused one-token kernels decline under it, and the
    experts go one product per selected expert, so each product's QWeight is exactly the bytes it reads); embedding
    rows by wrapping the model's `embedding`; KV rows by counting what attention decodes from the cache's Rows."""
    import torch

    import v4cli.model.deepseek4 as ds
    from kernels.dispatch import observing
    from v4cli.model.cache import Rows

    stacks = [(w.raw.data_ptr(), w.raw.data_ptr() + w.raw.numel())
              for b in model.blocks for w in (b.moe.w1, b.moe.w3, b.moe.w2)]
    got = {"dense": 0.0, "experts": 0.0, "embedding": 0.0, "kv": 0.0, "state": 0.0}

    def on_product(x, w):
        ptr = w.raw.data_ptr()
        got["experts" if any(a <= ptr < b for a, b in stacks) else "dense"] += w.raw.numel()

    def on_embedding(ids, w):
        got["embedding"] += ids.numel() * w.row_bytes

    def wrap(fn, before):
        def wrapped(*args):
            before(*args)
            return fn(*args)
        return wrapped

    inside = []  # Rows.stored may decode through Rows.get: only the outermost read counts

    def rows_read(name):
        fn = getattr(Rows, name)

        def counted(self, *args):
            if not inside:
                n = args[0].numel() if name == "take" else self.n
                got["kv"] += n * self.codec.row_bytes(self.dim)
            inside.append(name)
            try:
                return fn(self, *args)
            finally:
                inside.pop()
        return counted

    patches = [(ds, "embedding", wrap(ds.embedding, on_embedding))]
    patches += [(Rows, name, rows_read(name)) for name in ("get", "take", "stored")]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    # the compressors' buffers are read (concatenated with the new rows) on every step
    got["state"] += sum(getattr(p, k).numel() * 4 for lc in cache.layers for p in lc.parts().values()
                     for k in _STATE_TENSORS if getattr(p, k) is not None)
    got["dense"] += sum(t.numel() * t.element_size() for t in _held_f32(model))
    # hash-routed layers read the token's row of tid2eid (MoE.route: tid2eid[ids])
    got["embedding"] += sum(b.moe.tid2eid[0].numel() * b.moe.tid2eid.element_size()
                            for b in model.blocks if b.moe.hash)
    try:
        for obj, name, fn in patches:
            setattr(obj, name, fn)
        with torch.inference_mode(), observing(on_product):
            model.forward(torch.tensor([1000]), cache, last_only=True)
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    return got


def decode_speed(engine, tokens: int) -> dict:
    """Greedy decode from context 0 through the engine: the median gap between yielded tokens (one decode step
    each; the first two tokens, the prefill's and the first decoded one, are not gaps)."""
    from v4cli.engine.records import DoneRecord
    from v4cli.engine.sampling import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=tokens + 2, stop_on_eos=False)
    stamps = [time.perf_counter() for rec in engine.generate([1000], sp) if not isinstance(rec, DoneRecord)]
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return {"tokens": len(gaps), "median_s": statistics.median(gaps), "tps": 1 / statistics.median(gaps)}


def worker(job: dict) -> dict:
    """One context in this (fresh) process: memory, the counted decode step, and at context 0 speed + meter."""
    import torch

    from v4cli.engine import loader
    from v4cli.engine.select import load_engine

    torch.set_num_threads(job["threads"])
    loader.prepare_kernels()  # the kernels' libraries (and their first build) are not the model's memory
    out = {"ctx": job["ctx"], "kv_format": job["kv_format"], "rss_before": rss()}
    engine = load_engine(job["gguf"], "torch", kv_format=job["kv_format"], threads=job["threads"],
                         ctx=max(job["ctx"], 1))
    model = engine.model
    out["rss_loaded"] = rss()
    if job.get("speed"):  # timed first: the cache filled below would otherwise sit in memory beside it
        decode_speed(engine, 2)  # warm-up: first-call allocations and thread start are not the engine's speed
        out["speed"] = decode_speed(engine, job["decode_tokens"])
        out["meter"] = meter(job["threads"])
    n = job["ctx"]
    out["fill"] = "prefill" if n <= job["prefill_max"] else "append"
    if out["fill"] == "prefill":
        # one chunk into a throwaway cache first: the prefill's working memory (kernel scratch, thread buffers),
        # which stays with the process, is then resident before the baseline and not counted as cache
        fill_prefill(model, engine.new_cache(), min(n, CHUNK), seed=1)
    out["rss_empty_cache"] = rss()
    cache = engine.new_cache()
    t0 = time.perf_counter()
    if out["fill"] == "prefill":
        fill_prefill(model, cache, n)
    else:
        torch.set_num_threads(1)  # thousands of tiny ops: on a busy machine two threads' barriers cost 10x
        fill_append(model, cache, n)
        torch.set_num_threads(job["threads"])
    out["fill_s"] = time.perf_counter() - t0
    out["rss_filled"] = rss()
    out["cache"] = cache_bytes(cache)
    out["counted"] = count_decode_step(model, cache)
    return out


# --------------------------------------------------------------------------------------------- the report


def memory_rows(r: dict, p: Planned) -> list[dict]:
    """(component, what was measured, planned, measured) rows of one context."""
    before, loaded, c = r["rss_before"], r["rss_loaded"], r["cache"]
    empty, filled = r["rss_empty_cache"], r["rss_filled"]
    fill = r["fill"]
    return [
        {"component": "weights in RAM", "measured_by": "RssFile growth at load", "planned": p.weights_ram,
         "measured": loaded["RssFile"] - before["RssFile"]},
        {"component": "KV cache", "measured_by": f"cache's own count ({fill})", "planned": p.kv,
         "measured": c["kv_held"]},
        {"component": "compressor state", "measured_by": f"cache tensors allocated ({fill})", "planned": p.state,
         "measured": c["state_alloc"]},
        {"component": "KV + compressor state", "measured_by": f"RssAnon growth at fill ({fill})",
         "planned": p.kv + p.state, "measured": filled["RssAnon"] - empty["RssAnon"]},
    ]


def _fmt(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def _ctx(n: int) -> str:
    return f"{n >> 10}K" if n and n % 1024 == 0 else str(n)


def report(results: list[dict], plans: dict[int, Planned], kv_format: str) -> tuple[dict, bool]:
    ok = True
    mem, reads = [], []
    for r in results:
        p = plans[r["ctx"]]
        if r["ctx"]:
            for row in memory_rows(r, p):
                row["ratio"] = row["measured"] / row["planned"] if row["planned"] else float("inf")
                row["ok"] = abs(row["ratio"] - 1) <= TOLERANCE
                ok &= row["ok"]
                mem.append({"ctx": r["ctx"], **row})
        for comp, counted in r["counted"].items():
            plan = p.read[comp]
            reads.append({"ctx": r["ctx"], "component": comp, "planned": plan, "counted": counted,
                          "ratio": counted / plan if plan else float("inf")})
        tot_p, tot_c = sum(p.read.values()), sum(r["counted"].values())
        reads.append({"ctx": r["ctx"], "component": "total", "planned": tot_p, "counted": tot_c,
                      "ratio": tot_c / tot_p})

    print(f"\nMemory, kv {kv_format}: planned vs measured (within {TOLERANCE:.0%}?)")
    print(f"{'ctx':>5}  {'component':<22}{'measured by':<38}{'planned':>12}{'measured':>12}{'ratio':>8}  ok")
    for m in mem:
        print(f"{_ctx(m['ctx']):>5}  {m['component']:<22}{m['measured_by']:<38}{_fmt(m['planned']):>12}"
              f"{_fmt(m['measured']):>12}{m['ratio']:>8.3f}  {'yes' if m['ok'] else 'NO'}")
    print(f"\nBytes read per decoded token, kv {kv_format}: planned vs counted in one decode step")
    print(f"{'ctx':>5}  {'component':<12}{'planned':>12}{'counted':>12}{'ratio':>8}")
    for x in reads:
        print(f"{_ctx(x['ctx']):>5}  {x['component']:<12}{_fmt(x['planned']):>12}{_fmt(x['counted']):>12}"
              f"{x['ratio']:>8.3f}")
    out = {"kv_format": kv_format, "memory": mem, "read_per_token": reads, "workers": results}
    speed = next((r for r in results if "speed" in r), None)
    if speed is not None:
        s, m = speed["speed"], speed["meter"]
        per_token = sum(plans[speed["ctx"]].read.values())
        achieved = per_token * s["tps"]
        pct = 100 * achieved / (m["gbs"] * 1e9)
        ok &= pct <= 100
        print(f"\nMeter bound: decode at ctx 0 {s['tps']:.2f} tok/s (median of {s['tokens']} gaps) × "
              f"{_fmt(per_token)}/token = {achieved / 1e9:.2f} GB/s = {pct:.0f} % of {m['name']} {m['gbs']:.1f} GB/s "
              "(" + ", ".join(f"{k.removesuffix('_gbs')} {v:.1f}" for k, v in m.items() if k.endswith("_gbs")) + ") — "
              f"{'ok' if pct <= 100 else 'OVER 100 %'}")
        out["bound"] = {**s, "bytes_per_token": per_token, "achieved_gbs": achieved / 1e9, "meter": m,
                        "pct_of_meter": pct}
    notes = []
    if any(m["measured_by"].startswith("RssAnon") and "(prefill)" in m["measured_by"] for m in mem):
        notes.append("RssAnon at a prefilled context also holds what the prefill left beyond its first chunk "
                     "(buffers sized by the context, allocator fragmentation): compare the appended contexts")
    if any(x["ctx"] == 0 and x["component"] == "dense" and x["ratio"] < 1 for x in reads):
        notes.append("short contexts: while a CSA layer holds <= index_topk entries the model skips the indexer "
                     "(every entry is chosen): its two projections (dense) and its keys (kv) are not read; the new "
                     "token's own KV row is attention's input, not a cache read")
    for n_ in notes:
        print("note: " + n_)
    fills = sorted({(r["ctx"], r["fill"], round(r["fill_s"], 1)) for r in results if r["ctx"]})
    print("\nFill: " + "; ".join(f"{_ctx(c)} by {f} ({s:.0f} s)" for c, f, s in fills) +
          f". prefill = real {CHUNK}-token chunked prefill; append = random rows through the cache's own "
          "Rows.append/keep_last in a prefill chunk's row counts")
    return out, ok


def run_worker(job: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith(_RESULT))
    return json.loads(line[len(_RESULT):])


def check(gguf: Path, contexts: list[int], kv_format: str, threads: int, prefill_max: int, decode_tokens: int,
          speed: bool = True, progress=print) -> tuple[dict, bool]:
    """Every context in its own process; the plan for each; the report. → (results, all rows within bounds)."""
    results, plans = [], {}
    t_start = time.perf_counter()
    for i, ctx in enumerate(contexts):
        eta = ""
        if i:
            per = (time.perf_counter() - t_start) / i
            eta = f", ETA {per * (len(contexts) - i):.0f} s"
        progress(f"... context {ctx} ({i + 1}/{len(contexts)}, kv {kv_format}{eta})")
        job = {"gguf": str(gguf), "ctx": ctx, "kv_format": kv_format, "threads": threads,
               "prefill_max": prefill_max, "decode_tokens": decode_tokens, "speed": speed and ctx == 0}
        results.append(run_worker(job))
        plans[ctx] = planned(gguf, ctx, kv_format)
    return report(results, plans, kv_format)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/v4-plan-check"), help="cache folder for the model")
    ap.add_argument("--layers", type=int, default=4, help="mini-Flash layers (4: window-only, CSA, HCA, CSA)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--recipe", default="q8")
    ap.add_argument("--contexts", default="512,4096,32768,131072",
                    help="memory contexts (0 is added: bytes read and speed at an empty cache)")
    ap.add_argument("--kv", default="bf16", help="KV formats, comma-separated (bf16,fp8)")
    ap.add_argument("--prefill-max", type=int, default=4096,
                    help="contexts up to this are filled by a real prefill, longer ones through the cache's appends "
                         "(a 4K prefill of the 4-layer file: ~30 s on an idle 2-core machine, ~10 min on a busy one)")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    a = ap.parse_args()

    from engine_bench import model_file

    a.work.mkdir(parents=True, exist_ok=True)
    print(f"... model: mini-Flash {a.layers} layers, {a.experts} experts, {a.recipe} (built once under {a.work})")
    gguf = model_file(a.work, a.layers, a.experts, a.recipe)
    contexts = [0, *(int(x) for x in a.contexts.split(",") if int(x))]
    out, ok = {"model": str(gguf), "layers": a.layers, "experts": a.experts, "recipe": a.recipe, "runs": []}, True
    for fmt in a.kv.split(","):
        res, good = check(gguf, contexts, fmt, a.threads, a.prefill_max, a.decode_tokens, speed=fmt == "bf16")
        out["runs"].append(res)
        ok &= good
    if a.json is not None:
        from v4cli.store import atomic_write_json

        atomic_write_json(a.json, out)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    _here = Path(__file__).resolve().parent
    sys.path[:0] = [str(_here.parent), str(_here)]  # the repository's packages, and engine_bench beside this file
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(_RESULT + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
