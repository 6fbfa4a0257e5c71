"""Engine benchmark on a mini-Flash model: our torch engine vs llama.cpp, decode against the bandwidth roofline.

Builds (once, cached under --work) a mini-Flash checkpoint (true Flash per-layer dims, few layers and experts),
converts it with --recipe, and runs `v4cli.bench` on it: prefill and decode tok/s per engine, each engine in a
fresh subprocess per repeat, % of the memory-bandwidth bound and the extrapolation to full Flash.

    python benchmarks/engine_bench.py --threads 2 --prefill 512 --contexts 0,2048 --decode-tokens 16 --repeats 1

`--layout NAME` benchmarks a community file instead (facts §10: ds4-q2-q4, ad-iq2_xxs, ad-iq3_xxs, ud-k): the
lossless mini-Flash GGUF re-quantized by llama.cpp's own quantizer to that recipe's per-tensor types (with an
importance matrix where the recipe was made with one), as the community's files are made.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from quant.convert import convert
from quant.recipes import get_recipe
from v4cli import bench
from v4cli.commands.bench import render
from v4cli.store import atomic_write_json
from v4cli.testing.tiny import make_tiny_checkpoint


def model_file(work: Path, layers: int, experts: int, recipe: str) -> Path:
    """The mini-Flash GGUF for these settings, built on first use."""
    ckpt = make_tiny_checkpoint(work / f"mini-flash-{layers}L-{experts}E", preset="mini-flash",
                                num_hidden_layers=layers, n_routed_experts=experts)
    out = work / f"mini-flash-{layers}L-{experts}E-{recipe}.gguf"
    stamp = out.with_suffix(".stamp")
    # the checkpoint's stamp changes when it is rebuilt; the GGUF is converted again then
    want = (ckpt / ".complete").read_text()
    if not out.exists() or not stamp.exists() or stamp.read_text() != want:
        convert(ckpt, out, get_recipe(recipe))
        stamp.write_text(want)
    return out


def layout_file(work: Path, layers: int, experts: int, layout: str) -> Path:
    """The mini-Flash file in a community layout, made by llama.cpp's quantizer on first use."""
    from v4cli.testing.wild import quantize_layout

    src = model_file(work, layers, experts, "lossless")
    out = work / f"mini-flash-{layers}L-{experts}E-{layout}.gguf"
    stamp = out.with_suffix(".stamp")
    want = src.with_suffix(".stamp").read_text()
    if not out.exists() or not stamp.exists() or stamp.read_text() != want:
        quantize_layout(src, out, layout, n_layers=layers)
        stamp.write_text(want)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/v4-engine-bench"), help="cache folder for the model")
    ap.add_argument("--recipe", default="q8", help="conversion recipe (q8, q2k-q3k, ...)")
    ap.add_argument("--layout", default=None, help="a community layout instead of --recipe (ds4-q2-q4, ad-iq2_xxs, "
                    "ad-iq3_xxs, ud-k): made by llama.cpp's quantizer from the lossless file")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--engines", default=",".join(bench.DEFAULT_ENGINES))
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    ap.add_argument("--prefill", default="512")
    ap.add_argument("--contexts", default="0,2048")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--kv-format", default="bf16")
    ap.add_argument("--device", default="cpu", help="torch device for our engine (cuda: GPU memory is reported too)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    a = ap.parse_args()

    a.work.mkdir(parents=True, exist_ok=True)
    if a.layout:
        gguf = layout_file(a.work, a.layers, a.experts, a.layout)
    else:
        gguf = model_file(a.work, a.layers, a.experts, a.recipe)
    spec = bench.BenchSpec(str(gguf), tuple(a.engines.split(",")), a.threads,
                           tuple(int(x) for x in a.prefill.split(",")), tuple(int(x) for x in a.contexts.split(",")),
                           a.decode_tokens, a.repeats, a.kv_format, a.device)
    result = bench.run_bench(spec, progress=lambda msg: print(f"... {msg}", flush=True))
    result["recipe"] = f"layout {a.layout}" if a.layout else a.recipe
    result["mini_flash"] = {"layers": a.layers, "experts": a.experts}
    render(result)
    if a.json is not None:
        atomic_write_json(a.json, result)


if __name__ == "__main__":
    main()
