"""Engine benchmark: prefill and decode speed of each engine on one GGUF, against the memory-bandwidth roofline.

Each measurement pass of an engine runs in a fresh subprocess (`python -m v4cli.bench --worker SPEC OUT`), so
peak RSS is that engine's own, and passes are interleaved engine by engine per repeat, because the machines this
runs on are noisy and two engines timed minutes apart are not comparable. Reported numbers are medians.

Decode is memory-bound: a decoded token reads every non-expert weight, k_active/n_experts of the routed experts,
one row of the lookup tables and the KV entries attention visits. `bytes ÷ bandwidth` bounds the time per token.
The full-Flash extrapolation keeps the measured per-layer cost per byte and scales it to Flash's 43 layers.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quant import names as N
from quant.config import FLASH_CONFIG, ModelArgs
from v4cli import kvsize
from v4cli.errors import BadInput, V4Error
from v4cli.gguf_file import GGUFModel, open_gguf

DEFAULT_ENGINES = ("torch", "llama")
DEFAULT_PREFILL = (512, 8192)
DEFAULT_CONTEXTS = (0, 8192, 32768)
DEFAULT_DECODE_TOKENS = 32
DEFAULT_REPEATS = 3
BANDWIDTH_BYTES = 1 << 28  # per array: 256 MiB, far beyond any L3 cache
WORKER_TIMEOUT_S = 3 * 3600
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")  # GGUF block prefix (quant/names.py builds names as blk.{layer}.<name>)


@dataclass(frozen=True)
class BenchSpec:
    """What to measure. Defaults live in the DEFAULT_* constants above (the command uses the same ones)."""

    model: str
    engines: tuple[str, ...] = DEFAULT_ENGINES
    threads: int = 0  # 0 = all cores
    prefill: tuple[int, ...] = DEFAULT_PREFILL
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    decode_tokens: int = DEFAULT_DECODE_TOKENS
    repeats: int = DEFAULT_REPEATS
    kv_format: str = "bf16"
    device: str = "cpu"
    chunk: int = 256
    seed: int = 0

    @property
    def n_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def positions_needed(self) -> int:
        """Longest sequence any measurement builds (prompt plus the decoded tokens fed back)."""
        return max([*self.prefill, *(max(c, 1) + self.decode_tokens for c in self.contexts), 1])


# ---------------------------------------------------------------------------------------------- memory bandwidth
def measure_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeats: int = 5, threads: int | None = None,
                      device: str = "cpu") -> dict:
    """STREAM-style copy (a = b) and triad (a = b + s·c) in torch over f64 arrays of `nbytes` each; → median GB/s.

    Bytes counted as STREAM does: copy 2 per element, triad 3 (write-allocate traffic not counted). Also a
    read-only pass (Σ b), the access pattern of decode's weight streaming, shown beside the triad roofline.
    On a GPU (`device="cuda"`) the arrays live in its memory: the roofline of an engine that runs there.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    n = max(nbytes // 8, 1)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a = torch.empty(n, dtype=torch.float64, device=dev)
    b, c = torch.rand(n, dtype=torch.float64, device=dev), torch.rand(n, dtype=torch.float64, device=dev)
    a.copy_(b)  # touch every page before timing
    copy_s, triad_s, read_s = [], [], []

    def timed(fn, into: list[float]) -> None:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        into.append(time.perf_counter() - t0)

    for _ in range(repeats):
        timed(b.sum, read_s)
        timed(lambda: a.copy_(b), copy_s)
        timed(lambda: torch.add(b, c, alpha=3.0, out=a), triad_s)
    return {"array_bytes": n * 8, "repeats": repeats,
            "copy_gbs": 2 * n * 8 / statistics.median(copy_s) / 1e9,
            "triad_gbs": 3 * n * 8 / statistics.median(triad_s) / 1e9,
            "read_gbs": n * 8 / statistics.median(read_s) / 1e9}


# -------------------------------------------------------------------------------------------- bytes per token
@dataclass
class WeightBytes:
    """Weight bytes one decoded token reads, split by where they live in the model."""

    fixed: float = 0.0  # model-level tensors: head, final norm, mHC head, one embedding row
    layers: dict[int, float] = field(default_factory=dict)  # per main layer: non-expert + active expert bytes
    experts: float = 0.0  # the routed-expert share of `layers` (k_active / n_experts of the stacked tensors)
    lookup: float = 0.0  # one row of each lookup table (embedding, hash routing)

    @property
    def total(self) -> float:
        return self.fixed + sum(self.layers.values())

    @property
    def non_expert(self) -> float:
        return self.total - self.experts


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def weight_bytes_per_token(gf: GGUFModel) -> WeightBytes:
    """Weight bytes read per decoded token, from the file's tensor sizes (draft/MTP blocks are not run)."""
    args = gf.args
    share = args.num_experts_per_tok / args.n_routed_experts
    out = WeightBytes(layers={layer: 0.0 for layer in range(args.num_hidden_layers)})
    for name, t in gf.tensors.items():
        role = N.role_of_gguf(name)
        if role in (N.EMBED, N.TID2EID):
            b = t.nbytes / _rows(t.shape)  # a lookup reads the token's row only
            out.lookup += b
        elif role == N.EXPS:
            b = t.nbytes * share
            out.experts += b
        else:
            b = float(t.nbytes)
        m = _BLOCK_RE.match(name)
        if m is None:
            out.fixed += b
        elif int(m.group(1)) in out.layers:
            out.layers[int(m.group(1))] += b
        elif role == N.EXPS:
            out.experts -= b  # an MTP block's experts: not read while decoding
    return out


def kv_read_bytes(args: ModelArgs, fmt: str, context: int, layers: range | None = None) -> dict[int, float]:
    """KV bytes each layer reads to decode one token after `context` tokens.

    Every layer reads its raw window; HCA layers all compressed entries; CSA layers the indexer's top-k entries
    plus every indexer key (the indexer scores them all).
    """
    n = context + 1  # the new token is in the cache when attention runs
    entry, ikey = kvsize.entry_bytes(args, fmt), kvsize.index_key_bytes(args, fmt)
    out = {}
    for layer in layers if layers is not None else range(args.num_hidden_layers):
        b = min(n, args.sliding_window) * entry
        ratio = args.layer_ratio(layer)
        if ratio:
            visible = n // ratio
            if args.is_csa(layer):
                b += min(args.index_topk, visible) * entry + visible * ikey
            else:
                b += visible * entry
        out[layer] = float(b)
    return out


def decode_bytes(weights: WeightBytes, args: ModelArgs, fmt: str, context: int) -> float:
    """Total bytes read per decoded token at `context`: weights plus KV."""
    return weights.total + sum(kv_read_bytes(args, fmt, context).values())


def flash_layer_bytes(weights: WeightBytes, args: ModelArgs) -> tuple[float, float]:
    """(bytes of this file's main layers, bytes of full Flash's 43 layers at the same per-layer costs).

    Flash's layer of a kind (SWA / CSA / HCA by compress ratio) costs what this file's layers of that kind cost on
    average; a kind this file lacks costs the mean of its layers. Active expert bytes per layer do not depend on
    the expert count (k experts are read either way), so 32 experts stand in for 256.
    """
    by_kind: dict[int, list[float]] = {}
    for layer, b in weights.layers.items():
        by_kind.setdefault(args.layer_ratio(layer), []).append(b)
    mean = sum(weights.layers.values()) / max(len(weights.layers), 1)
    flash = flash_args()
    total = sum(statistics.mean(by_kind.get(flash.layer_ratio(layer), [mean]))
                for layer in range(flash.num_hidden_layers))
    return sum(weights.layers.values()), total


def flash_args() -> ModelArgs:
    return ModelArgs.from_config(FLASH_CONFIG)


def extrapolate_flash(tps: float, weights: WeightBytes, args: ModelArgs, fmt: str, context: int,
                      bandwidth: float) -> dict:
    """Full-Flash decode tok/s from a measured tok/s on this file.

    The fixed part (head etc.) is assumed to stream at the bandwidth bound; the rest of the measured time is
    the layers' (weights + KV), and Flash's layers cost the same time per byte.
    """
    flash = flash_args()
    layer_bytes, flash_layer_w = flash_layer_bytes(weights, args)
    layer_bytes += sum(kv_read_bytes(args, fmt, context).values())
    flash_layers = flash_layer_w + sum(kv_read_bytes(flash, fmt, context).values())
    t_fixed = weights.fixed / bandwidth
    flash_bytes = weights.fixed + flash_layers
    out = {"bytes_per_token": flash_bytes, "roofline_tps": bandwidth / flash_bytes, "tps": None, "roofline_pct": None}
    if tps > 0:
        t_layers = max(1.0 / tps - t_fixed, 0.0)
        t = t_fixed + t_layers * flash_layers / layer_bytes
        out["tps"] = 1.0 / t
        out["roofline_pct"] = 100.0 * out["tps"] / out["roofline_tps"]
    return out


# ------------------------------------------------------------------------------------------------ one pass
def run_pass(spec: BenchSpec, engine: str) -> dict:
    """Load `engine` and take every measurement once (meant to run in a fresh process: see `run_bench`)."""
    import torch

    from v4cli.engine.generate import peak_rss_bytes
    from v4cli.engine.sampling import SamplingParams
    from v4cli.engine.select import load_engine
    from v4cli.testing.tiny import random_token_ids

    torch.set_num_threads(spec.n_threads)
    t0 = time.perf_counter()
    eng = load_engine(spec.model, engine, kv_format=spec.kv_format, device=spec.device, threads=spec.n_threads,
                      ctx=spec.positions_needed())
    load_s = time.perf_counter() - t0
    vocab = min(eng.args.vocab_size, 128000)

    def timed(n_prompt: int, n_new: int):
        ids = random_token_ids(max(n_prompt, 1), seed=spec.seed, vocab=vocab)
        sp = SamplingParams(temperature=0.0, max_tokens=n_new, stop_on_eos=False)
        return list(eng.generate(ids, sp, chunk=spec.chunk))[-1]

    # warm-up: first-call allocations, thread-pool start and (on a GPU) Triton's compiles are not the engine's speed;
    # 64 tokens reach both the decode-sized and the GEMM-sized kernels
    timed(min(64, *spec.prefill), 2)
    prefill, decode = {}, {}
    for p in spec.prefill:
        done = timed(p, 1)
        prefill[str(p)] = {"tps": p / done.timings.prefill_s, "ttft_s": done.timings.ttft_s}
    for c in spec.contexts:
        done = timed(c, spec.decode_tokens + 1)
        decode[str(c)] = {"tps": done.timings.decode_tps, "ttft_s": done.timings.ttft_s,
                          "kv_bytes": done.memory.kv_bytes}
        if c > 0:
            # decode at context 0 again, right after: the ratio of the two is taken seconds apart, not minutes
            # (a long prefill sits between this and the context-0 run above, and a shared box drifts meanwhile)
            decode[str(c)]["paired_ctx0_tps"] = timed(0, spec.decode_tokens + 1).timings.decode_tps
    gpu = torch.cuda.max_memory_allocated() if spec.device.startswith("cuda") else None
    return {"engine": engine, "load_s": load_s, "prefill": prefill, "decode": decode,
            "peak_rss_bytes": peak_rss_bytes(), "gpu_peak_bytes": gpu}


def _run_worker(spec: BenchSpec, engine: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="v4bench-") as tmp:
        out = Path(tmp) / "pass.json"
        cmd = [sys.executable, "-m", "v4cli.bench", "--worker", json.dumps({**asdict(spec), "engine": engine}),
               str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False)
        if r.returncode != 0 or not out.exists():
            tail = " | ".join(ln for ln in r.stderr.strip().splitlines()[-3:])
            raise V4Error(f"the {engine} benchmark worker failed (exit {r.returncode}): {tail or 'no output'}",
                          hint="run with V4_DEBUG=1 for the worker's traceback")
        return json.loads(out.read_text())


def check_spec(spec: BenchSpec, args: ModelArgs) -> None:
    """Reject settings the model or the engines cannot run, naming the limit."""
    from v4cli.engine.select import ENGINES

    bad = [e for e in spec.engines if e not in ENGINES]
    if bad or not spec.engines:
        raise BadInput(f"unknown engine(s) {', '.join(bad) or '(none)'}", hint=f"choose from {', '.join(ENGINES)}")
    if any(p < 1 for p in spec.prefill) or any(c < 0 for c in spec.contexts):
        raise BadInput("prefill lengths must be ≥ 1 and contexts ≥ 0")
    if spec.decode_tokens < 1 or spec.repeats < 1 or spec.threads < 0:
        raise BadInput("--decode-tokens and --repeats must be ≥ 1, --threads ≥ 0")
    limit = args.max_position_embeddings
    if spec.positions_needed() > limit:
        longest = limit - spec.decode_tokens - 1
        raise BadInput(f"the longest run needs {spec.positions_needed()} positions; the model's context is {limit}",
                       hint=f"keep --prefill ≤ {limit} and --contexts ≤ {longest}")


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else 0.0


def summarize(spec: BenchSpec, passes: dict[str, list[dict]], weights: WeightBytes, args: ModelArgs,
              bandwidth: dict) -> dict:
    """Medians of the passes, roofline percentages, ours/llama.cpp ratios and the Flash extrapolation."""
    bw = bandwidth["triad_gbs"] * 1e9
    engines = list(passes)
    result = {
        "model": spec.model, "spec": asdict(spec), "threads": spec.n_threads, "bandwidth": bandwidth,
        "weights": {"bytes_per_token": weights.total, "fixed": weights.fixed, "non_expert": weights.non_expert,
                    "experts_active": weights.experts, "lookup_rows": weights.lookup,
                    "layers": sum(weights.layers.values()), "n_layers": len(weights.layers)},
        "engines": {e: {"load_s": _median([p["load_s"] for p in ps]),
                        "peak_rss_bytes": max(p["peak_rss_bytes"] for p in ps),
                        "gpu_peak_bytes": max((p["gpu_peak_bytes"] or 0) for p in ps) if spec.device != "cpu" else None}
                    for e, ps in passes.items()},
        "prefill": [], "decode": [],
    }

    def ratio(row: dict, key: str):
        if "torch" in row and "llama" in row and row["llama"][key] > 0:
            return row["torch"][key] / row["llama"][key]
        return None

    for p in spec.prefill:
        row = {"tokens": p}
        for e in engines:
            row[e] = {k: _median([ps["prefill"][str(p)][k] for ps in passes[e]]) for k in ("tps", "ttft_s")}
        row["ratio"] = ratio(row, "tps")
        result["prefill"].append(row)
    for c in spec.contexts:
        total = decode_bytes(weights, args, spec.kv_format, c)
        row = {"context": c, "bytes_per_token": total, "roofline_tps": bw / total, "flash": {}}
        for e in engines:
            runs = [ps["decode"][str(c)] for ps in passes[e]]
            tps = _median([d["tps"] for d in runs])
            row[e] = {"tps": tps, "ttft_s": _median([d["ttft_s"] for d in runs]),
                      "kv_bytes": _median([d["kv_bytes"] for d in runs]),
                      "roofline_pct": 100.0 * tps * total / bw,
                      "vs_ctx0": _median([d["tps"] / d["paired_ctx0_tps"] for d in runs if d.get("paired_ctx0_tps")])
                      or None}
            row["flash"][e] = extrapolate_flash(tps, weights, args, spec.kv_format, c, bw)
        row["ratio"] = ratio(row, "tps")
        result["decode"].append(row)
    return result


def run_bench(spec: BenchSpec, progress: Callable[[str], None] | None = None, measure_bw: bool = True,
              bandwidth_bytes: int = BANDWIDTH_BYTES) -> dict:
    """Benchmark every engine in `spec` on its model; → a JSON-ready result dict (see `summarize`)."""
    say = progress or (lambda _msg: None)
    gf = open_gguf(spec.model)
    args = gf.validate_deepseek4()
    check_spec(spec, args)
    weights = weight_bytes_per_token(gf)
    gf.close()
    passes: dict[str, list[dict]] = {e: [] for e in spec.engines}
    samples: list[dict] = []
    for r in range(spec.repeats):
        if measure_bw:  # once per repeat, beside its passes: a shared machine's bandwidth drifts during a run
            say(f"repeat {r + 1}/{spec.repeats}: measuring memory bandwidth")
            samples.append(measure_bandwidth(bandwidth_bytes, threads=spec.n_threads, device=spec.device))
        for e in spec.engines:  # interleaved: both engines see the same machine state per repeat
            say(f"repeat {r + 1}/{spec.repeats}: {e}")
            passes[e].append(_run_worker(spec, e))
    return summarize(spec, passes, weights, args, combine_bandwidth(samples))


def combine_bandwidth(samples: list[dict]) -> dict:
    """The per-repeat bandwidth measurements as one: the median of each figure, the samples kept beside it."""
    if not samples:
        return {"array_bytes": 0, "repeats": 0, "copy_gbs": math.nan, "triad_gbs": math.nan, "samples": []}
    out = {k: _median([s[k] for s in samples]) for k in ("copy_gbs", "triad_gbs", "read_gbs")}
    return {"array_bytes": samples[0]["array_bytes"], "repeats": sum(s["repeats"] for s in samples), **out,
            "samples": samples}


def can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(result: dict, out: Path) -> None:
    """Decode tok/s vs context per engine, with the roofline, as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from v4cli.store import atomic_open

    ctx = [row["context"] for row in result["decode"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ctx, [row["roofline_tps"] for row in result["decode"]], "k--", label="bandwidth bound")
    for e in result["engines"]:
        ax.plot(ctx, [row[e]["tps"] for row in result["decode"]], "o-", label=e)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tok/s")
    ax.legend()
    with atomic_open(Path(out)) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def _worker_main(argv: list[str]) -> None:
    from v4cli.store import atomic_write_json

    raw = json.loads(argv[0])
    engine = raw.pop("engine")
    spec = BenchSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    atomic_write_json(Path(argv[1]), run_pass(spec, engine))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m v4cli.bench --worker SPEC_JSON OUT_JSON (internal; use `v4 bench`)")
