"""Regenerate tests/data/llama-imatrix-tiny.gguf: llama.cpp's `llama-imatrix` run on our default tiny model.

    python tests/data/make_llama_imatrix.py            # builds llama.cpp's tools first if they are not cached
    python tests/data/make_llama_imatrix.py --check    # rerun and compare with the committed fixture, write nothing

The model is `make_tiny_checkpoint(preset=PRESET)` converted with the f32 recipe (every weight F32, so the
activations llama.cpp sees are not shaped by any quantization). The command line is `command()` below and is
recorded in tests/data/README.md together with how llama-imatrix chunks the text.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "llama-imatrix-tiny.gguf"
CALIB = HERE / "imatrix-calib.txt"
PRESET = "tiny-128"  # llama.cpp loads only compress ratios 0, 4 and 128: the default "tiny" (ratio 16) is refused
N_CTX = 64  # chunk size; -b is the same so each chunk is one decode of one sequence
THREADS = 2


def tiny_gguf(folder: Path) -> Path:
    """The tiny f32 GGUF the fixture is computed on (deterministic: the checkpoint is seeded)."""
    from quant.convert import convert
    from quant.recipes import get_recipe
    from v4cli.testing.tiny import make_tiny_checkpoint

    out = folder / "tiny-f32.gguf"
    if not out.is_file():
        convert(make_tiny_checkpoint(folder / "ckpt", preset=PRESET), out, get_recipe("f32"))
    return out


def command(tool: Path, model: Path, out: Path) -> list[str]:
    """llama-imatrix's command line. Run with cwd = tests/data so the dataset recorded in the file is the bare
    name `imatrix-calib.txt`, not a machine's path."""
    return [str(tool), "-m", str(model), "-f", CALIB.name, "-o", str(out),
            "-c", str(N_CTX), "-b", str(N_CTX), "--no-ppl", "-t", str(THREADS), "--no-repack"]


def run(model: Path, out: Path) -> subprocess.CompletedProcess:
    from v4cli.testing.llama_tools import llama_tool

    r = subprocess.run(command(llama_tool("llama-imatrix"), model, out), cwd=HERE, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(THREADS)}, timeout=600)
    if r.returncode != 0 or not out.is_file():
        raise SystemExit(f"llama-imatrix failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare a fresh run with the committed fixture")
    ap.add_argument("--work", type=Path, help="keep the tiny model here (default: a temp folder)")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent.parent))
    from quant.imatrix import load_imatrix

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = tiny_gguf(work)
        out = Path(tmp) / "imatrix.gguf"
        r = run(model, out)
        if args.check:
            a, b = load_imatrix(out), load_imatrix(FIXTURE)
            assert a.sums.keys() == b.sums.keys(), sorted(set(a.sums) ^ set(b.sums))
            worst = max(float(np.max(np.abs(a.sums[k] - b.sums[k]) / np.maximum(b.sums[k], 1e-30)))
                        for k in a.sums)
            same = all((a.counts[k] == b.counts[k]).all() for k in a.sums)
            print(f"{len(a.sums)} entries, counts equal: {same}, largest relative sum difference: {worst:.3g}")
            return
        shutil.copyfile(out, FIXTURE)
        print(r.stderr[-1500:])
        print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
