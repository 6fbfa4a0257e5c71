"""Engine benchmark: prefill and decode speed of each engine on one GGUF, against the memory-bandwidth roofline.

Each measurement pass of an engine runs in a fresh subprocess (`python -m v4cli.bench --worker SPEC OUT`), so
peak RSS is that engine's own, and passes are interleaved engine by engine per repeat, because the machines this
runs on are noisy and two engines timed minutes apart are not comparable. Speeds are medians; the bandwidth is the best sample (it bounds them).

Decode is memory-bound: `bytes ÷ bandwidth` bounds the time per token, with the bytes a decoded token reads from
v4cli.planning.traffic and the bandwidth from v4cli.planning.machine's meter (the same ones `v4 plan` uses).
The full-Flash figure is an estimate, not a measurement: it keeps the measured time per layer byte and scales it
to Flash's 43 layers.

Decode speed is timed per token (the gap between two yielded tokens) and every token of every repeat goes into one
pool per context; the reported tok/s is 1 / the pool's median gap, so one stalled token (another process taking
the core) moves it little. Context 0 is decoded again after each longer context and those tokens join its pool:
the one context-0 figure spans the run, and "÷ ctx 0" is computed from the table's own figures.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from quant.config import FLASH_CONFIG, ModelArgs
from quant.errors import BadInput, V4Error
from v4cli.engine.options import RUN
from v4cli.gguf_file import open_gguf
from v4cli.planning.machine import BANDWIDTH_BYTES, measure_bandwidth
from v4cli.planning.tensors import Inventory
from v4cli.planning.traffic import WeightRead, decode_read, kv_read, weight_read

DEFAULT_ENGINES = ("torch", "llama")  # those of them that are installed, when --engines is not given


@dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark run: prompt lengths, decode contexts, tokens decoded per context, repeats."""

    prefill: tuple[int, ...]
    contexts: tuple[int, ...]
    decode_tokens: int
    repeats: int


# quick: the tiny demo model in about a minute on 2 cores; full: the long contexts the README's tables use
PRESETS = {"quick": Preset((512, 4096), (0, 4096), 32, 3),
           "full": Preset((512, 8192), (0, 8192, 32768), 32, 3)}
DEFAULT_PRESET = "quick"
NOISY_SPREAD_PCT = 25.0  # interquartile range of the per-token times above this % of their median: a busy machine
_EVENT = "V4BENCH "  # prefix of the worker's progress lines on its stdout (anything else there is not ours)


@dataclass(frozen=True)
class BenchSpec:
    """What to measure. Defaults live in the DEFAULT_* constants above (the command uses the same ones)."""

    model: str
    engines: tuple[str, ...] = DEFAULT_ENGINES
    threads: int = 0  # 0 = all cores
    prefill: tuple[int, ...] = PRESETS[DEFAULT_PRESET].prefill
    contexts: tuple[int, ...] = PRESETS[DEFAULT_PRESET].contexts
    decode_tokens: int = PRESETS[DEFAULT_PRESET].decode_tokens
    repeats: int = PRESETS[DEFAULT_PRESET].repeats
    kv_format: str = RUN.kv_format
    device: str = RUN.device
    chunk: int = RUN.chunk
    seed: int = 0

    @property
    def n_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def positions_needed(self) -> int:
        """Longest sequence any measurement builds (prompt plus the decoded tokens fed back)."""
        return max([*self.prefill, *(max(c, 1) + self.decode_tokens for c in self.contexts), 1])

    def steps(self) -> list[tuple[str, float]]:
        """(name, rough cost in prefill-token units) of each step of one pass, in order; the cost only seeds the
        ETA until a step has been timed once (a decoded token costs about 20 prefill tokens on CPU)."""
        tok = 20 * self.decode_tokens
        again = tok if 0 in self.contexts else 0  # context 0 decoded again after each longer context
        return [("load", 512.0), ("warm-up", 64.0 + 40),
                *((f"prefill {p}", float(p)) for p in self.prefill),
                *((f"decode at {c}", float(c + tok + (again if c else 0))) for c in self.contexts)]


def flash_layer_bytes(weights: WeightRead, args: ModelArgs) -> tuple[float, float]:
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
    """Full DeepSeek-V4-Flash's args, from its config alone."""
    return ModelArgs.from_config(FLASH_CONFIG)


def extrapolate_flash(tps: float, weights: WeightRead, args: ModelArgs, fmt: str, context: int,
                      bandwidth: float) -> dict:
    """Full-Flash decode tok/s from a measured tok/s on this file.

    The fixed part (head etc.) is assumed to stream at the bandwidth bound; the rest of the measured time is
    the layers' (weights + KV), and Flash's layers cost the same time per byte.
    """
    flash = flash_args()
    layer_bytes, flash_layer_w = flash_layer_bytes(weights, args)
    layer_bytes += kv_read(args, fmt, context)
    flash_layers = flash_layer_w + kv_read(flash, fmt, context)
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
def run_pass(spec: BenchSpec, engine: str, on_step: Callable[[str], None] = lambda _name: None) -> dict:
    """Load `engine` and take every measurement once (meant to run in a fresh process: see `run_bench`).

    `on_step(name)` is called as each of `spec.steps()` starts.
    """
    import torch

    from v4cli.engine.generate import peak_rss_bytes
    from v4cli.engine.records import DoneRecord
    from v4cli.engine.sampling import SamplingParams
    from v4cli.engine.select import load_engine
    from v4cli.testing.tiny import random_token_ids

    torch.set_num_threads(spec.n_threads)
    on_step("load")
    t0 = time.perf_counter()
    eng = load_engine(spec.model, engine, kv_format=spec.kv_format, device=spec.device, threads=spec.n_threads,
                      ctx=spec.positions_needed())
    load_s = time.perf_counter() - t0
    vocab = min(eng.args.vocab_size, 128000)

    def timed(n_prompt: int, n_new: int) -> tuple[DoneRecord, list[float]]:
        """The run's DoneRecord and the gaps between its yielded tokens (one decode step each)."""
        ids = random_token_ids(max(n_prompt, 1), seed=spec.seed, vocab=vocab)
        sp = SamplingParams(temperature=0.0, max_tokens=n_new, stop_on_eos=False)
        stamps, done = [], None
        for rec in eng.generate(ids, sp, chunk=spec.chunk):
            if isinstance(rec, DoneRecord):
                done = rec
            else:
                stamps.append(time.perf_counter())
        return done, [b - a for a, b in zip(stamps, stamps[1:])]

    # warm-up: first-call allocations, thread-pool start and (on a GPU) Triton's compiles are not the engine's speed;
    # 64 tokens reach both the decode-sized and the GEMM-sized kernels
    on_step("warm-up")
    timed(min(64, *spec.prefill), 2)
    prefill, decode = {}, {}
    for p in spec.prefill:
        on_step(f"prefill {p}")
        done, _ = timed(p, 1)
        prefill[str(p)] = {"tps": p / done.timings.prefill_s, "ttft_s": done.timings.ttft_s}
    for c in spec.contexts:
        on_step(f"decode at {c}")
        done, gaps = timed(c, spec.decode_tokens + 1)
        decode[str(c)] = {"token_s": gaps, "ttft_s": done.timings.ttft_s, "kv_bytes": done.memory.kv_bytes}
        if c > 0 and "0" in decode:
            # context 0 again: its pool then holds tokens from across the pass, not only from its start
            decode["0"]["token_s"] += timed(0, spec.decode_tokens + 1)[1]
    gpu = torch.cuda.max_memory_allocated() if spec.device.startswith("cuda") else None
    return {"engine": engine, "load_s": load_s, "prefill": prefill, "decode": decode,
            "peak_rss_bytes": peak_rss_bytes(), "gpu_peak_bytes": gpu}


class WorkerFailed(V4Error):
    """One engine's measurement pass failed; the message is the worker's error in one line."""

    def __init__(self, engine: str, message: str, hint: str | None = None):
        super().__init__(f"the {engine} pass failed: {message}", hint=hint)
        self.engine, self.repeat = engine, None


def _run_worker(spec: BenchSpec, engine: str, on_step: Callable[[str], None]) -> dict:
    """One pass of `engine` in a fresh process; its progress lines go to `on_step`, its error becomes one line."""
    debug = bool(os.environ.get("V4_DEBUG"))
    with tempfile.TemporaryDirectory(prefix="v4bench-") as tmp:
        out, log = Path(tmp) / "pass.json", Path(tmp) / "stderr.txt"
        cmd = [sys.executable, "-m", "v4cli.bench", "--worker", json.dumps({**asdict(spec), "engine": engine}),
               str(out)]
        error = None
        with open(log, "w") as err:
            # with V4_DEBUG the worker's stderr (its traceback) goes to the terminal as it happens
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None if debug else err, text=True)
            for line in proc.stdout:
                if line.startswith(_EVENT):
                    event = json.loads(line[len(_EVENT):])
                    if "step" in event:
                        on_step(event["step"])
                    else:
                        error = event
            rc = proc.wait()
        if rc == 0 and out.exists():
            return json.loads(out.read_text())
        if error is None:  # killed, or died in C code: the last line it wrote is all there is
            tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
            error = {"message": f"exit {rc}" + (f": {tail[0].strip()}" if tail else ""), "hint": None}
        raise WorkerFailed(engine, error["message"], hint=error["hint"] or "V4_DEBUG=1 shows the worker's traceback")


# llama.cpp's deepseek4 loader accepts these compress ratios only (the tiny demo model uses 16: it cannot load it)
LLAMA_COMPRESS_RATIOS = frozenset({0, 4, 128})


def engine_problem(engine: str, args: ModelArgs, device: str = RUN.device) -> str | None:
    """Why `engine` cannot run this model here, in a few words, or None if it can.

    llama.cpp is imported in a child process with this process's interpreter and environment: that is what the
    benchmark's workers will see (a module hidden from this process only, or only from them, is judged as they
    would find it).
    """
    if engine == "llama":
        if device != "cpu":
            return f"it runs on its own backends, not torch device {device!r}"
        odd = sorted(set(args.compress_ratios) - LLAMA_COMPRESS_RATIOS)
        if odd:
            return (f"llama.cpp loads compress ratios {'/'.join(map(str, sorted(LLAMA_COMPRESS_RATIOS)))} only, "
                    f"this model has {'/'.join(map(str, odd))}")
        r = subprocess.run([sys.executable, "-c", "import llama_cpp; from llama_cpp import llama_cpp"],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            from v4cli.engine.llama import INSTALL_HINT

            return f"llama-cpp-python is not installed ({INSTALL_HINT})"
    return None


def choose_engines(model: str | Path, requested: tuple[str, ...] | None,
                   device: str = RUN.device) -> tuple[tuple[str, ...], list[str]]:
    """(engines to run, notes on those left out). Asked-for engines must all run; by default the ones that can."""
    from v4cli.engine.select import ENGINES

    with open_gguf(model) as gf:
        args = gf.validate_deepseek4()

    if requested is not None:
        bad = [e for e in requested if e not in ENGINES]
        if bad or not requested:
            raise BadInput(f"unknown engine(s) {', '.join(bad) or '(none)'}", hint=f"choose from {', '.join(ENGINES)}")
        for e in requested:
            if why := engine_problem(e, args, device):
                raise BadInput(f"cannot benchmark the {e} engine: {why}", hint="leave it out of --engines")
        return requested, []
    engines, notes = [], []
    for e in DEFAULT_ENGINES:
        why = engine_problem(e, args, device)
        if why:
            notes.append(f"skipping the {e} engine: {why}")
        else:
            engines.append(e)
    return tuple(engines), notes


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


def token_stats(gaps: list[float]) -> tuple[float, float]:
    """(tok/s, spread %) of a pool of per-token times: 1 / median, and the interquartile range over the median."""
    if not gaps:
        return 0.0, 0.0
    med = statistics.median(gaps)
    q = statistics.quantiles(gaps, n=4) if len(gaps) > 1 else [med, med, med]
    return 1.0 / med, 100.0 * (q[2] - q[0]) / med


# a layer's shape: what must match Flash's for its measured time per byte to stand for a Flash layer's
_LAYER_SHAPE = ("hidden_size", "moe_intermediate_size", "head_dim", "num_attention_heads", "q_lora_rank")


def flash_basis(args: ModelArgs, layer_bytes: float, flash_layer_bytes_: float) -> dict:
    """The basis of the Flash estimate, shown beside it; `shown` is False (with the reason) when this model's
    layers are not Flash-shaped: scaling a tiny model's time to 43 layers would estimate a 43-layer tiny model."""
    flash = flash_args()
    differ = [f"{k} {getattr(args, k)} vs {getattr(flash, k)}" for k in _LAYER_SHAPE
              if getattr(args, k) != getattr(flash, k)]
    return {"shown": not differ, "why_not": "; ".join(differ) or None, "layers": flash.num_hidden_layers,
            "layer_bytes_measured": layer_bytes, "layer_bytes_flash": flash_layer_bytes_,
            "scale": flash_layer_bytes_ / layer_bytes if layer_bytes else None}


def summarize(spec: BenchSpec, passes: dict[str, list[dict]], weights: WeightRead, args: ModelArgs,
              bandwidth: dict) -> dict:
    """Medians of the passes, roofline percentages, ours/llama.cpp ratios and (for a model with Flash's layer
    shapes and fewer layers or experts) the Flash estimate.

    Engines with no finished pass are left out; `spec.repeats` may exceed an engine's passes when one failed.
    """
    bw = bandwidth["bound_gbs"] * 1e9
    passes = {e: ps for e, ps in passes.items() if ps}
    engines = list(passes)
    layer_bytes, flash_layer_w = flash_layer_bytes(weights, args)
    result = {
        "model": spec.model, "spec": asdict(spec), "threads": spec.n_threads, "bandwidth": bandwidth,
        "weights": {"bytes_per_token": weights.total, "fixed": weights.fixed, "non_expert": weights.non_expert,
                    "experts_active": weights.experts, "lookup_rows": weights.lookup,
                    "layers": sum(weights.layers.values()), "n_layers": len(weights.layers)},
        "flash_estimate": flash_basis(args, layer_bytes, flash_layer_w),
        "engines": {e: {"passes": len(ps), "load_s": _median([p["load_s"] for p in ps]),
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
        total = decode_read(weights, args, spec.kv_format, c)
        row = {"context": c, "bytes_per_token": total, "roofline_tps": bw / total, "flash": {}}
        for e in engines:
            runs = [ps["decode"][str(c)] for ps in passes[e]]
            tps, spread = token_stats([g for d in runs for g in d["token_s"]])
            row[e] = {"tps": tps, "spread_pct": spread, "tokens": sum(len(d["token_s"]) for d in runs),
                      "ttft_s": _median([d["ttft_s"] for d in runs]),
                      "kv_bytes": _median([d["kv_bytes"] for d in runs]),
                      "roofline_pct": 100.0 * tps * total / bw}
            if result["flash_estimate"]["shown"]:
                row["flash"][e] = extrapolate_flash(tps, weights, args, spec.kv_format, c, bw)
        row["ratio"] = ratio(row, "tps")
        result["decode"].append(row)
    base = next((row for row in result["decode"] if row["context"] == 0), None)
    for row in result["decode"]:  # from the table's own figures, so the two cannot disagree
        for e in engines:
            row[e]["vs_ctx0"] = row[e]["tps"] / base[e]["tps"] if base and base[e]["tps"] > 0 else None
    return result


@dataclass(frozen=True)
class BenchProgress:
    """Where a benchmark is: the step now running and the seconds spent and (roughly) left."""

    repeat: int  # 1-based
    repeats: int
    engine: str | None  # None while measuring memory bandwidth
    step: str
    elapsed_s: float
    eta_s: float | None

    def __str__(self) -> str:
        eta = f", about {self.eta_s:.0f} s left" if self.eta_s is not None else ""
        return f"repeat {self.repeat}/{self.repeats} · {self.engine or 'memory'} · {self.step}{eta}"


class _Clock:
    """ETA of a run: each step's time once measured (a repeat repeats it), until then its cost × seconds/unit."""

    def __init__(self, spec: BenchSpec, measure_bw: bool):
        self.spec, self.t0 = spec, time.perf_counter()
        self.plan = [(r, None, "memory bandwidth", 256.0) for r in range(spec.repeats) if measure_bw]
        self.plan = sorted(self.plan + [(r, e, name, cost) for r in range(spec.repeats) for e in spec.engines
                                        for name, cost in [("start", 512.0), *spec.steps()]],
                           key=lambda s: s[0])  # stable: bandwidth first in each repeat, then engines in order
        self.took: dict[tuple, float] = {}  # (engine, step) → seconds of its last run
        self.done = 0  # index into plan of the step running now
        self.units_s: list[float] = []  # seconds per cost unit of the timed steps
        self.current: tuple | None = None
        self.started = self.t0

    def start(self, repeat: int, engine: str | None, step: str) -> None:
        now = time.perf_counter()
        if self.current is not None:
            _, e, name, cost = self.current
            self.took[(e, name)] = now - self.started
            self.units_s.append((now - self.started) / cost)
        idx = next((i for i in range(self.done, len(self.plan))
                    if self.plan[i][:3] == (repeat, engine, step)), self.done)
        self.done, self.current, self.started = idx, self.plan[idx], now

    def skip_engine(self, engine: str) -> None:
        """A failed engine's remaining steps are not run: drop them from the plan."""
        self.plan = self.plan[:self.done + 1] + [s for s in self.plan[self.done + 1:] if s[1] != engine]

    def event(self, repeat: int, engine: str | None, step: str) -> BenchProgress:
        self.start(repeat, engine, step)
        rate = statistics.median(self.units_s) if self.units_s else None
        left = []
        for _, e, name, cost in self.plan[self.done:]:
            if (e, name) in self.took:
                left.append(self.took[(e, name)])
            elif rate is not None:
                left.append(cost * rate)
            else:
                left = None
                break
        return BenchProgress(repeat + 1, self.spec.repeats, engine, step, time.perf_counter() - self.t0,
                             sum(left) if left is not None else None)


def run_bench(spec: BenchSpec, progress: Callable[[BenchProgress], None] | None = None, measure_bw: bool = True,
              bandwidth_bytes: int = BANDWIDTH_BYTES) -> dict:
    """Benchmark every engine in `spec` on its model; → a JSON-ready result dict (see `summarize`).

    A pass that fails drops its engine from the later repeats and is listed under "failures" (one line each);
    the passes that finished are still summarized. Only when nothing finished is the first failure raised.
    """
    say = progress or (lambda _event: None)
    gf = open_gguf(spec.model)
    args = gf.validate_deepseek4()
    check_spec(spec, args)
    weights = weight_read(Inventory.from_gguf_file(gf))
    gf.close()
    passes: dict[str, list[dict]] = {e: [] for e in spec.engines}
    failures: list[WorkerFailed] = []
    samples: list[dict] = []
    clock = _Clock(spec, measure_bw)
    for r in range(spec.repeats):
        if measure_bw:  # once per repeat, beside its passes: a shared machine's bandwidth drifts during a run
            say(clock.event(r, None, "memory bandwidth"))
            # on all cores whatever --threads says: the bound is the machine's, the one `v4 plan` uses
            samples.append(measure_bandwidth(spec.device, bandwidth_bytes))
        for e in spec.engines:  # interleaved: both engines see the same machine state per repeat
            if any(f.engine == e for f in failures):
                continue
            say(clock.event(r, e, "start"))
            try:
                passes[e].append(_run_worker(spec, e, lambda step, r=r, e=e: say(clock.event(r, e, step))))
            except WorkerFailed as f:
                f.repeat = r + 1
                failures.append(f)
                clock.skip_engine(e)
    if not any(passes.values()):
        raise failures[0]
    result = summarize(spec, passes, weights, args, combine_bandwidth(samples))
    result["failures"] = [{"engine": f.engine, "repeat": f.repeat, "message": str(f), "hint": f.hint}
                          for f in failures]
    result["elapsed_s"] = time.perf_counter() - clock.t0
    return result


def combine_bandwidth(samples: list[dict]) -> dict:
    """The per-repeat bandwidth measurements as one: the highest of each figure (it is a bound: a busy machine
    measured at its median put decode at 146 % of it), the samples kept beside it."""
    keys = ("read_gbs", "copy_gbs", "triad_gbs", "bound_gbs")
    if not samples:
        return {"array_bytes": 0, "repeats": 0, **{k: math.nan for k in keys}, "samples": []}
    out = {k: max(s[k] for s in samples) for k in keys}
    return {"array_bytes": samples[0]["array_bytes"], "repeats": sum(s["repeats"] for s in samples), **out,
            "samples": samples}


PLOT_HINT = "pip install 'v4[plot]' (or pip install matplotlib)"


def require_matplotlib() -> None:
    """Raise BadInput now, before minutes of measuring, if `--plot` could not be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInput("--plot needs matplotlib, which is not installed", hint=PLOT_HINT) from None


def plot(result: dict, out: Path) -> None:
    """Prefill tok/s per prompt length and decode tok/s vs context per engine, with the bound, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from v4cli.store import atomic_open

    engines = [e for e in result["spec"]["engines"] if e in result["engines"]]  # a JSON round trip sorts the keys
    fig, (pre, dec) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(len(engines), 1)
    for i, e in enumerate(engines):
        xs = [j + i * width for j in range(len(result["prefill"]))]
        pre.bar(xs, [row[e]["tps"] for row in result["prefill"]], width, label=e)
    pre.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(result["prefill"]))],
                   [str(row["tokens"]) for row in result["prefill"]])
    pre.set_xlabel("prompt tokens")
    pre.set_ylabel("prefill tok/s")
    pre.set_title("prefill")
    pre.legend()
    ctx = [row["context"] for row in result["decode"]]
    dec.plot(ctx, [row["roofline_tps"] for row in result["decode"]], "k--", label="memory-bandwidth bound")
    for e in engines:
        dec.plot(ctx, [row[e]["tps"] for row in result["decode"]], "o-", label=e)
    dec.set_ylim(bottom=0)
    dec.set_xlabel("context (tokens)")
    dec.set_ylabel("decode tok/s (median per-token time)")
    dec.set_title("decode")
    dec.legend()
    fig.suptitle(f"{Path(result['model']).name}, {result['threads']} threads", fontsize=10)
    fig.tight_layout()
    with atomic_open(Path(out)) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _worker_main(argv: list[str]) -> None:
    """A pass in this process: progress and a failure as `_EVENT` lines on stdout, the result as JSON in a file."""
    import traceback

    from v4cli.store import atomic_write_json

    def emit(event: dict) -> None:
        print(_EVENT + json.dumps(event), flush=True)

    raw = json.loads(argv[0])
    engine = raw.pop("engine")
    spec = BenchSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    try:
        result = run_pass(spec, engine, on_step=lambda name: emit({"step": name}))
    except V4Error as e:
        emit({"message": str(e), "hint": e.hint})
        traceback.print_exc()
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the boundary of this process: any failure becomes one line for the parent
        first = str(e).strip().splitlines()[:1]
        emit({"message": type(e).__name__ + (f": {first[0]}" if first else ""), "hint": None})
        traceback.print_exc()
        sys.exit(1)
    atomic_write_json(Path(argv[1]), result)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m v4cli.bench --worker SPEC_JSON OUT_JSON (internal; use `v4 bench`)")
