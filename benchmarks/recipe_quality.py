"""Our quantize recipes against llama.cpp's quantizer on the same layout, scored on the *trained* tiny model.

For each recipe: our converter writes the file with our quantizers (guided by the importance matrix `v4 imatrix`
makes from the built-in calibration text), and llama.cpp's `llama_model_quantize` requantizes the lossless GGUF
to exactly the same per-tensor types with the same importance values. Both files are then run by the same
engine on held-out tokens the model never trained on; the table gives each file's size, KL(lossless ‖ file) and
top-1 agreement with the lossless file, ours and llama.cpp's side by side. Same layout, same importance: the
difference is the quantizers alone.

The tiny-128 checkpoint (llama.cpp's compression ratios, 16 indexer heads) is trained on this package's source
(v4cli/testing/trained.py); its experts' rows (256) are whole I-quant blocks, so every expert is quantized to the
recipe's type, while the narrow attention projections fall back to Q8_0 as they would in any 256-block type.

    python benchmarks/recipe_quality.py [--work /tmp/v4-recipe-quality] [--steps 2500] [--tokens 1024]

(2500 steps: ~35 minutes on 2 cores; the training loss ends near 5.8 nats, the held-out loss near 9.5.)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant.convert import convert  # noqa: E402
from quant.imatrix import Imatrix, load_imatrix  # noqa: E402
from quant.recipes import get_recipe  # noqa: E402
from v4cli.commands.imatrix import calibration_text  # noqa: E402
from v4cli.engine import Engine  # noqa: E402
from v4cli.engine.imatrix import calibration_windows, collect  # noqa: E402
from v4cli.gguf_file import open_gguf  # noqa: E402
from v4cli.testing.trained import train_tiny  # noqa: E402
from v4cli.testing.wild import layout, quantize_like  # noqa: E402
from benchmarks.wild_agreement import compare  # noqa: E402

TIE = 1e-3  # KL ratios within this of 1 are ties: the same algorithm, float sums in another order
RECIPES = ("q2k", "q2k-q3k", "q3k", "iq2-80", "iq2-90", "iq2-100", "iq3-108")


def nll(logits: torch.Tensor, ids: list[int]) -> float:
    """Mean next-token loss (nats) of the held-out text."""
    lp = torch.log_softmax(logits[:-1].double(), -1)
    return -lp.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()


def make_imatrix(model_path: Path, out: Path, chunk: int, chunks: int | None = None) -> Imatrix:
    """`v4 imatrix` on the built-in calibration text (its first `chunks` chunks), in process; kept at `out`."""
    if out.exists():
        return load_imatrix(out)
    text, names = calibration_text([])
    eng = Engine.load(model_path, kv_format="f32")
    with open_gguf(model_path) as gf:
        windows = calibration_windows(text, eng.tokenizer, gf.metadata, gf.args.bos_token_id, chunk)[:chunks]
    im = Imatrix({}, {}, names, 0, chunk)
    for _ in collect(eng.model, eng.model.tensors, windows, im):
        pass
    im.save(out)
    return im


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/v4-recipe-quality"))
    ap.add_argument("--steps", type=int, default=2500, help="training steps for the trained checkpoint")
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens scored")
    ap.add_argument("--chunk", type=int, default=128, help="imatrix chunk size (tokens)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = train_tiny(a.work / f"tiny128-trained-{a.steps}", preset="tiny-128", steps=a.steps)
    held = torch.load(ckpt / "held_out_ids.pt").tolist()[: a.tokens]
    lossless = a.work / f"lossless-{a.steps}.gguf"
    if not lossless.exists():
        convert(ckpt, lossless, get_recipe("lossless"))
    base = Engine.load(lossless, kv_format="f32").logits(held, chunk=256)
    im = make_imatrix(lossless, a.work / f"imatrix-{a.steps}.gguf", a.chunk)
    top_p = torch.softmax(base.double(), -1).max(-1).values.mean().item()
    print(f"trained tiny-128: {a.steps} steps (training.json in {ckpt}); lossless held-out loss {nll(base, held):.3f} "
          f"nats (ppl {math.exp(nll(base, held)):.1f}), mean top-1 probability {top_p:.3f}; {len(held)} held-out "
          f"tokens; imatrix: {im.chunk_count} chunks of {im.chunk_size} tokens of the built-in calibration text")
    print("KL(lossless ‖ file) in nats, mean over positions; top-1 = agreement with the lossless file's argmax")
    head = (f"{'recipe':9s} {'size kB':>8s} {'= llama':>7s} {'KL ours':>8s} {'KL llama':>9s} {'ratio':>6s} "
            f"{'top-1 ours':>10s} {'top-1 llama':>11s} {'loss ours':>9s} {'loss llama':>10s}")
    print(head)
    print("-" * len(head))
    worse = []
    for name in a.recipes.split(","):
        ours = a.work / f"{name}-{a.steps}.gguf"
        if not ours.exists():
            convert(ckpt, ours, get_recipe(name), imatrix=im, imatrix_file="imatrix.gguf")
        theirs = quantize_like(lossless, ours, a.work / f"{name}-{a.steps}-llama.gguf", im)
        lo = Engine.load(ours, kv_format="f32").logits(held, chunk=256)
        ll = Engine.load(theirs, kv_format="f32").logits(held, chunk=256)
        kl_o, t_o = compare(base, lo)
        kl_l, t_l = compare(base, ll)
        same = "yes" if layout(ours) == layout(theirs) else "no"
        print(f"{name:9s} {ours.stat().st_size / 1e3:8.0f} {same:>7s} {kl_o:8.4f} {kl_l:9.4f} {kl_o / kl_l:6.3f} "
              f"{t_o:10.3f} {t_l:11.3f} {nll(lo, held):9.3f} {nll(ll, held):10.3f}", flush=True)
        if kl_o > kl_l * (1 + TIE):
            worse.append(f"{name} ({kl_o / kl_l:.3f})")
    print(f"ours worse than llama.cpp's quantizer (KL ratio > {1 + TIE}) on: {', '.join(worse) or 'none'}  "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
