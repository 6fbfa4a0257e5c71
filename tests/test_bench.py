"""`v4 bench` library and command: bandwidth, bytes per token, a tiny end-to-end run of both engines."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
from cli_util import run_cli
from gguf import GGUFReader

from quant.config import FLASH_CONFIG, ModelArgs
from v4cli import bench
from v4cli.model import kvsize
from quant.errors import BadInput
from v4cli.gguf_file import GGUFFile
from v4cli.planning.machine import measure_bandwidth
from v4cli.planning.tensors import Inventory
from v4cli.planning.traffic import WeightRead, kv_read_by_layer, weight_read

PRESET = "tiny-128"  # llama.cpp loads this preset only
SMALL = ["--threads", "1", "--prefill", "16", "--contexts", "0,32", "--decode-tokens", "3", "--repeats", "1"]


@pytest.fixture(scope="module")
def q8(tiny_gguf):
    return tiny_gguf("q8", PRESET)


def run(argv, capsys) -> tuple[int, str, str]:
    """The real entry point, error boundary included: (exit code, stdout, stderr)."""
    return run_cli(argv, capsys)


def shim_llama(tmp_path, monkeypatch, init: str, lib: str | None = None) -> None:
    """A `llama_cpp` package first on the PYTHONPATH that the bench's child processes inherit: what they import
    instead of the installed one (a `sys.modules` entry here would not reach them)."""
    pkg = tmp_path / "shim" / "llama_cpp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(init)
    if lib is not None:
        (pkg / "llama_cpp.py").write_text(lib)
    # the workers run `python -m v4cli.bench`: keep this checkout importable beside the shim
    repo = os.path.dirname(os.path.dirname(bench.__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path / "shim"), repo,
                                                                   os.environ.get("PYTHONPATH")])))


def test_bandwidth_samples_combine_as_the_best():
    mk = lambda t: {"array_bytes": 8, "repeats": 5, "copy_gbs": t / 2, "triad_gbs": t / 4, "bound_gbs": t,  # noqa: E731
                    "read_gbs": t / 3}
    bw = bench.combine_bandwidth([mk(30.0), mk(50.0), mk(40.0)])
    assert (bw["bound_gbs"], bw["copy_gbs"], bw["read_gbs"], bw["triad_gbs"]) == (50.0, 25.0, 50.0 / 3, 12.5)
    assert bw["repeats"] == 15 and len(bw["samples"]) == 3
    assert math.isnan(bench.combine_bandwidth([])["bound_gbs"])


def test_bandwidth_is_positive():
    bw = measure_bandwidth("cpu", 1 << 24, repeats=3, threads=1)
    assert bw["array_bytes"] == 1 << 24
    assert all(0.1 < bw[k] < 10_000 for k in ("copy_gbs", "triad_gbs", "bound_gbs", "read_gbs"))
    assert bw["bound_gbs"] == max(bw["read_gbs"], bw["copy_gbs"], bw["triad_gbs"])  # the fastest rate bounds decode


def test_weight_bytes_match_hand_count(q8):
    # independent count with gguf-py's reader: every tensor once, except lookups (one row) and experts (k/n)
    r = GGUFReader(q8)
    args = GGUFFile(q8).args
    k, n, vocab = args.num_experts_per_tok, args.n_routed_experts, args.vocab_size
    total = 0.0
    experts = 0.0
    for t in r.tensors:
        b = int(t.n_bytes)
        if t.name == "token_embd.weight" or t.name.endswith("ffn_gate_tid2eid.weight"):
            assert int(t.shape[-1]) == vocab  # ggml order: rows last
            b /= vocab
        elif t.name.endswith("_exps.weight"):
            b *= k / n
            experts += b
        total += b
    w = weight_read(Inventory.from_gguf_file(GGUFFile(q8)))
    n = len(r.tensors)  # whole bytes per tensor: each may round down by under one
    assert w.total == pytest.approx(total, abs=n)
    assert w.experts == pytest.approx(experts, abs=n) and experts > 0
    assert w.lookup == pytest.approx(256 * 2 + 2 * 2 * 4)  # one bf16 embedding row (hidden 256) + 2 hash rows
    assert len(w.layers) == args.num_hidden_layers and all(b > 0 for b in w.layers.values())
    output = next(int(t.n_bytes) for t in r.tensors if t.name == "output.weight")
    assert w.fixed > output  # head plus norms, mHC head and the embedding row


def test_kv_read_bytes_by_hand():
    args = ModelArgs.from_config({**FLASH_CONFIG, "num_hidden_layers": 3, "compress_ratios": [0, 4, 128, 0]})
    e = kvsize.entry_bytes(args, "bf16")  # 1024
    ik = kvsize.index_key_bytes(args, "bf16")  # 256
    assert (e, ik) == (1024, 256)
    got = kv_read_by_layer(args, "bf16", 4095)  # 4096 tokens with the new one
    assert got[0] == 128 * e  # window only
    assert got[1] == 128 * e + 512 * e + 1024 * ik  # window + top-512 of 1024 entries + all 1024 indexer keys
    assert got[2] == 128 * e + 32 * e  # window + all 4096/128 entries
    assert kv_read_by_layer(args, "bf16", 0)[1] == e  # one token: its window entry, no compressed entries


def test_flash_extrapolation_scales_layers():
    args = ModelArgs.from_config({**FLASH_CONFIG, "num_hidden_layers": 2, "compress_ratios": [0, 4, 0]})
    w = WeightRead(fixed=10**9, layers={0: 2 * 10**8, 1: 3 * 10**8})
    flash = bench.flash_args()
    _, flash_layers = bench.flash_layer_bytes(w, args)
    n_swa = sum(1 for layer in range(43) if flash.layer_ratio(layer) == 0)
    # SWA layers cost layer 0's bytes, CSA layer 1's, HCA (absent here) the mean of both
    n_csa = sum(1 for layer in range(43) if flash.is_csa(layer))
    assert flash_layers == pytest.approx(n_swa * 2e8 + n_csa * 3e8 + (43 - n_swa - n_csa) * 2.5e8)
    bw = 20e9
    out = bench.extrapolate_flash(2.0, w, args, "bf16", 0, bw)
    assert out["bytes_per_token"] > w.total and 0 < out["tps"] < 2.0
    assert out["roofline_pct"] == pytest.approx(100 * out["tps"] * out["bytes_per_token"] / bw)


def test_spec_checks(q8):
    args = GGUFFile(q8).args
    with pytest.raises(BadInput, match="context"):
        bench.check_spec(bench.BenchSpec(str(q8), contexts=(args.max_position_embeddings,)), args)
    with pytest.raises(BadInput, match="engine"):
        bench.check_spec(bench.BenchSpec(str(q8), engines=("tensorrt",)), args)
    bench.check_spec(bench.BenchSpec(str(q8)), args)


def _pass(gaps: dict[int, list[float]]) -> dict:
    return {"load_s": 1.0, "peak_rss_bytes": 1, "gpu_peak_bytes": None, "prefill": {"16": {"tps": 1.0, "ttft_s": 1.0}},
            "decode": {str(c): {"token_s": g, "ttft_s": 0.1, "kv_bytes": 10} for c, g in gaps.items()}}


def test_decode_figures_cannot_contradict_each_other(q8):
    # the old table took context 0 from one run and "÷ ctx 0" from others, so 8K could beat 0 in the table while
    # the line below said 0.71×; now ÷ ctx 0 is the table's own ratio and context 0 pools every context-0 token
    gf = GGUFFile(q8)
    args, w = gf.args, weight_read(Inventory.from_gguf_file(gf))
    spec = bench.BenchSpec(str(q8), engines=("torch",), prefill=(16,), contexts=(0, 32), repeats=2)
    passes = {"torch": [_pass({0: [0.010, 0.010, 0.050], 32: [0.020, 0.020]}),
                        _pass({0: [0.010, 0.012], 32: [0.025, 0.020, 0.200]})]}
    res = bench.summarize(spec, passes, w, args, {"bound_gbs": 10.0, "copy_gbs": 10.0, "read_gbs": 10.0,
                                                       "triad_gbs": 10.0})
    d0, d32 = (row["torch"] for row in res["decode"])
    assert d0["tps"] == pytest.approx(1 / 0.010) and d0["tokens"] == 5  # median of one pool, not of medians
    assert d32["tps"] == pytest.approx(1 / 0.020)
    assert d32["vs_ctx0"] == pytest.approx(d32["tps"] / d0["tps"]) and d0["vs_ctx0"] == 1.0
    assert d32["spread_pct"] > bench.NOISY_SPREAD_PCT  # the 0.2 s stall shows as spread, not as the figure
    assert res["engines"]["torch"]["passes"] == 2
    assert not res["flash_estimate"]["shown"] and "hidden_size 256 vs 4096" in res["flash_estimate"]["why_not"]
    assert res["decode"][0]["flash"] == {}  # no estimate where its basis does not hold


def test_flash_estimate_shown_for_flash_shaped_layers():
    flash = bench.flash_args()
    basis = bench.flash_basis(ModelArgs.from_config({**FLASH_CONFIG, "num_hidden_layers": 4}), 4e8, 43e8)
    assert basis["shown"] and basis["why_not"] is None and basis["scale"] == pytest.approx(10.75)
    assert basis["layers"] == flash.num_hidden_layers


def test_token_stats():
    assert bench.token_stats([0.1, 0.1, 0.1, 0.1]) == (pytest.approx(10.0), 0.0)
    tps, spread = bench.token_stats([0.1, 0.1, 0.3, 0.1])
    assert tps == pytest.approx(10.0) and spread > 0
    assert bench.token_stats([]) == (0.0, 0.0)


def test_eta_uses_each_steps_measured_time(q8, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    spec = bench.BenchSpec(str(q8), engines=("torch",), prefill=(16,), contexts=(0,), repeats=2)
    clock = bench._Clock(spec, measure_bw=False)
    steps = ["start", *(name for name, _ in spec.steps())]
    assert clock.event(0, "torch", "start").eta_s is None  # nothing timed yet: no guess
    for i, name in enumerate(steps[1:], 1):
        now[0] = float(i)  # every step of the first repeat takes 1 s
        ev = clock.event(0, "torch", name)
        assert ev.step == name and ev.repeat == 1 and ev.engine == "torch"
    now[0] = float(len(steps))
    ev = clock.event(1, "torch", "start")
    assert ev.eta_s == pytest.approx(len(steps))  # the second repeat: each step as long as it took the first time
    assert str(ev) == f"repeat 2/2 · torch · start, about {len(steps)} s left"


def test_llama_check_names_what_stops_it(q8, tiny_gguf):
    demo_like = GGUFFile(tiny_gguf("q8", "tiny")).args  # compress ratio 16: llama.cpp cannot load it
    assert "compress ratios" in bench.engine_problem("llama", demo_like)
    assert "device" in bench.engine_problem("llama", GGUFFile(q8).args, device="cuda")
    assert bench.engine_problem("torch", demo_like) is None


def test_bench_without_llama_drops_it_before_any_work(q8, tmp_path, monkeypatch, capsys):
    shim_llama(tmp_path, monkeypatch, "raise ImportError('hidden for this test')\n")
    out = tmp_path / "bench.json"
    code, stdout, err = run(["bench", q8, *SMALL, "--json", out], capsys)
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0].startswith("note: skipping the llama engine: llama-cpp-python is not installed")
    # progress: stage, engine and repeat, with an ETA once a step has been timed
    assert any(ln.startswith("bench: repeat 1/1 · torch · prefill 16, about ") for ln in lines)
    res = json.loads(out.read_text())
    assert list(res["engines"]) == ["torch"] and res["failures"] == []
    # a tiny model's layers are not Flash's: no estimate, and the line says why
    assert "est.*" not in stdout and "no Flash estimate: it scales this file's time per layer to Flash's 43 layers, " \
        "which needs Flash-shaped layers (hidden_size 256 vs 4096, " in stdout
    # asked for by name it fails at once, in one line
    code, stdout, err = run(["bench", q8, "--engines", "torch,llama"], capsys)
    assert code == 2 and stdout == ""
    assert err.splitlines() == [err.strip()] and "cannot benchmark the llama engine" in err


def test_failing_second_engine_keeps_the_first_ones_results(q8, tmp_path, monkeypatch, capsys):
    # imports (so the up-front check passes), then breaks when the worker loads the model: a broken build
    shim_llama(tmp_path, monkeypatch, "", lib="def __getattr__(name):\n    raise RuntimeError('broken build')\n")
    out = tmp_path / "bench.json"
    code, stdout, err = run(["bench", q8, *SMALL, "--json", out], capsys)
    assert code == 1
    assert "torch tok/s" in stdout and "llama tok/s" not in stdout  # the torch pass's table is printed
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the llama pass failed: RuntimeError: broken build (the table shows the passes")
    assert "Traceback" not in err and "bench: repeat 1/1 · llama · load" in err
    res = json.loads(out.read_text())  # and saved
    assert list(res["engines"]) == ["torch"] and res["decode"][0]["torch"]["tps"] > 0
    assert res["failures"][0]["engine"] == "llama" and res["failures"][0]["repeat"] == 1


def test_plot_without_matplotlib_fails_before_measuring(q8, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, stdout, err = run(["bench", q8, "--engines", "torch", "--plot", tmp_path / "p.png"], capsys)
    assert code == 2 and stdout == ""
    assert err.strip() == "error: --plot needs matplotlib, which is not installed (pip install 'v4[plot]' (or pip " \
                          "install matplotlib))"


@pytest.mark.llama
def test_bench_runs_both_engines_and_writes_json(q8, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("matplotlib")
    from typer.testing import CliRunner

    from v4cli.cli import app

    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", str(q8), "--threads", "1", "--prefill", "32", "--contexts", "0,64",
                                 "--decode-tokens", "3", "--repeats", "1", "--json", str(out), "--plot",
                                 str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    assert "prefill" in r.output and "decode" in r.output and "peak RSS" in r.output
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads(out.read_text())
    assert set(res["engines"]) == {"torch", "llama"}
    assert res["bandwidth"]["bound_gbs"] > 0 and res["weights"]["bytes_per_token"] > 0
    for e in ("torch", "llama"):
        assert res["engines"][e]["peak_rss_bytes"] > 100e6
        assert res["prefill"][0][e]["tps"] > 0 and res["prefill"][0][e]["ttft_s"] > 0
        for row in res["decode"]:
            assert row[e]["tps"] > 0 and row[e]["roofline_pct"] > 0 and row[e]["kv_bytes"] > 0
        # context 0: its own 3 tokens' gaps, then 2 more runs' worth after context 64
        assert res["decode"][0][e]["tokens"] == 3 + 3
    assert [row["context"] for row in res["decode"]] == [0, 64]
    row = res["decode"][1]
    assert row["ratio"] == pytest.approx(row["torch"]["tps"] / row["llama"]["tps"])
    assert res["decode"][1]["bytes_per_token"] > res["decode"][0]["bytes_per_token"]
    assert all(row[e]["vs_ctx0"] == pytest.approx(row[e]["tps"] / res["decode"][0][e]["tps"]) for e in res["engines"])
    assert len(res["bandwidth"]["samples"]) == 1  # one measurement per repeat
