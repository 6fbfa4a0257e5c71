"""`v4 bench` library and command: bandwidth, bytes per token, a tiny end-to-end run of both engines."""

from __future__ import annotations

import json
import math

import pytest
from gguf import GGUFReader

from quant.config import ModelArgs
from v4cli import bench, kvsize
from v4cli.errors import BadInput
from v4cli.gguf_file import GGUFFile

PRESET = "tiny-128"  # llama.cpp loads this preset only


@pytest.fixture(scope="module")
def q8(tiny_gguf):
    return tiny_gguf("q8", PRESET)


def test_bandwidth_samples_combine_as_medians():
    mk = lambda t: {"array_bytes": 8, "repeats": 5, "copy_gbs": t / 2, "triad_gbs": t, "read_gbs": t / 3}  # noqa: E731
    bw = bench.combine_bandwidth([mk(30.0), mk(50.0), mk(40.0)])
    assert (bw["triad_gbs"], bw["copy_gbs"], bw["read_gbs"]) == (40.0, 20.0, 40.0 / 3)
    assert bw["repeats"] == 15 and len(bw["samples"]) == 3
    assert math.isnan(bench.combine_bandwidth([])["triad_gbs"])


def test_bandwidth_is_positive():
    bw = bench.measure_bandwidth(1 << 24, repeats=3, threads=1)
    assert bw["array_bytes"] == 1 << 24
    assert all(0.1 < bw[k] < 10_000 for k in ("copy_gbs", "triad_gbs", "read_gbs"))


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
    w = bench.weight_bytes_per_token(GGUFFile(q8))
    assert w.total == pytest.approx(total, rel=1e-12)
    assert w.experts == pytest.approx(experts, rel=1e-12) and experts > 0
    assert w.lookup == pytest.approx(256 * 2 + 2 * 2 * 4)  # one bf16 embedding row (hidden 256) + 2 hash rows
    assert len(w.layers) == args.num_hidden_layers and all(b > 0 for b in w.layers.values())
    output = next(int(t.n_bytes) for t in r.tensors if t.name == "output.weight")
    assert w.fixed > output  # head plus norms, mHC head and the embedding row


def test_kv_read_bytes_by_hand():
    args = ModelArgs.from_config({"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
                                  "num_hidden_layers": 3, "compress_ratios": [0, 4, 128, 0], "sliding_window": 128,
                                  "index_topk": 512, "head_dim": 512, "index_head_dim": 128})
    e = kvsize.entry_bytes(args, "bf16")  # 1024
    ik = kvsize.index_key_bytes(args, "bf16")  # 256
    assert (e, ik) == (1024, 256)
    got = bench.kv_read_bytes(args, "bf16", 4095)  # 4096 tokens with the new one
    assert got[0] == 128 * e  # window only
    assert got[1] == 128 * e + 512 * e + 1024 * ik  # window + top-512 of 1024 entries + all 1024 indexer keys
    assert got[2] == 128 * e + 32 * e  # window + all 4096/128 entries
    assert bench.kv_read_bytes(args, "bf16", 0)[1] == e  # one token: its window entry, no compressed entries


def test_flash_extrapolation_scales_layers():
    args = ModelArgs.from_config({"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
                                  "num_hidden_layers": 2, "compress_ratios": [0, 4, 0]})
    w = bench.WeightBytes(fixed=1e9, layers={0: 2e8, 1: 3e8})
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


@pytest.mark.llama
def test_bench_runs_both_engines_and_writes_json(q8, tmp_path):
    pytest.importorskip("llama_cpp")
    from typer.testing import CliRunner

    from v4cli.cli import app

    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", str(q8), "--threads", "1", "--prefill", "32", "--contexts", "0,64",
                                 "--decode-tokens", "3", "--repeats", "1", "--json", str(out), "--plot",
                                 str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    assert "prefill" in r.output and "decode" in r.output and "peak RSS" in r.output
    res = json.loads(out.read_text())
    assert set(res["engines"]) == {"torch", "llama"}
    assert res["bandwidth"]["triad_gbs"] > 0 and res["weights"]["bytes_per_token"] > 0
    for e in ("torch", "llama"):
        assert res["engines"][e]["peak_rss_bytes"] > 100e6
        assert res["prefill"][0][e]["tps"] > 0 and res["prefill"][0][e]["ttft_s"] > 0
        for row in res["decode"]:
            assert row[e]["tps"] > 0 and 0 < row[e]["roofline_pct"] < 100 and row[e]["kv_bytes"] > 0
            assert row["flash"][e]["tps"] > 0
    assert [row["context"] for row in res["decode"]] == [0, 64]
    row = res["decode"][1]
    assert row["ratio"] == pytest.approx(row["torch"]["tps"] / row["llama"]["tps"])
    assert res["decode"][1]["bytes_per_token"] > res["decode"][0]["bytes_per_token"]
    # a longer context's decode also has a context-0 decode measured right after it, and their ratio
    assert res["decode"][0]["torch"]["vs_ctx0"] is None
    assert all(res["decode"][1][e]["vs_ctx0"] > 0 for e in ("torch", "llama"))
    assert "decode at 64 ÷ decode at 0, measured back to back" in r.output
    assert len(res["bandwidth"]["samples"]) == 1  # one measurement per repeat
