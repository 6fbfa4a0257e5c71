"""Files made by llama.cpp's tools, scored on the *trained* tiny model: how far each ftype is from the converter's
file, whether our fast kernels stay within the tests' KL bound of our reference kernels on it, and how far
llama.cpp's own logits on the same file are from ours.

The tiny-128 checkpoint (llama.cpp's compression ratios, 16 indexer heads) is trained briefly on this package's
source (v4cli/testing/trained.py), converted by llama.cpp's converter, and re-quantized by `llama_model_quantize`
to each ftype (with a random positive importance matrix where llama.cpp insists on one). Every row scores the same
held-out tokens.

    python benchmarks/wild_agreement.py [--work /tmp/v4-wild-agree] [--steps 200] [--tokens 512] [--ftypes Q2_K,...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v4cli.engine import Engine  # noqa: E402
from v4cli.engine.llama import LlamaEngine  # noqa: E402
from v4cli.testing.trained import train_tiny  # noqa: E402
from v4cli.testing.wild import FTYPES, llama_convert, llama_quantize, random_imatrix  # noqa: E402

KL_BOUND = 0.01  # tests/test_wild_gguf.py: fast kernels vs reference


def compare(ref: torch.Tensor, cand: torch.Tensor) -> tuple[float, float]:
    """Mean KL(ref ‖ cand) over positions and top-1 agreement, from [T, V] logits."""
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(cand.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item(), (ref.argmax(-1) == cand.argmax(-1)).double().mean().item()


def logits(path: Path, ids: list[int], kernels: str, chunk: int) -> torch.Tensor:
    if kernels == "reference":
        os.environ["V4_KERNELS"] = "reference"
    else:
        os.environ.pop("V4_KERNELS", None)
    return Engine.load(path, kv_format="f32").logits(ids, chunk=chunk)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/v4-wild-agree"))
    ap.add_argument("--steps", type=int, default=200, help="training steps for the trained checkpoint")
    ap.add_argument("--tokens", type=int, default=512, help="held-out tokens scored")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--ftypes", default=",".join(FTYPES))
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    ckpt = train_tiny(a.work / f"tiny128-trained-{a.steps}", preset="tiny-128", steps=a.steps)
    held = torch.load(ckpt / "held_out_ids.pt").tolist()[: a.tokens]
    conv = a.work / f"converted-{a.steps}.gguf"
    if not conv.exists():
        llama_convert(ckpt, conv)
    imatrix = random_imatrix(conv)
    base = logits(conv, held, "reference", a.chunk)
    print(f"trained tiny-128, {a.steps} steps (training.json in {ckpt}); {len(held)} held-out tokens; "
          f"KL in nats, mean over positions")
    print(f"{'ftype':10s} {'size MB':>8s} {'KL vs conv':>11s} {'top-1':>6s} {'KL fast':>9s} {'top-1':>6s} "
          f"{'KL llama':>9s} {'top-1':>6s}")
    worst = 0.0
    for ft in ["converter", *a.ftypes.split(",")]:
        path = conv
        if ft != "converter":
            path = a.work / f"{ft}-{a.steps}.gguf"
            if not path.exists():
                llama_quantize(conv, path, ft, imatrix=imatrix if FTYPES[ft][1] else None)
        ref = base if ft == "converter" else logits(path, held, "reference", a.chunk)
        fast = logits(path, held, "fast", a.chunk)
        llama = LlamaEngine.load(path, kv_format="f32").logits(held, chunk=a.chunk)
        q_kl, q_top = compare(base, ref)
        f_kl, f_top = compare(ref, fast)
        l_kl, l_top = compare(ref, llama)
        worst = max(worst, f_kl)
        print(f"{ft:10s} {path.stat().st_size / 1e6:8.1f} {q_kl:11.4f} {q_top:6.3f} {f_kl:9.5f} {f_top:6.3f} "
              f"{l_kl:9.5f} {l_top:6.3f}", flush=True)
    print(f"fast kernels vs reference: worst KL {worst:.5f} (bound {KL_BOUND}): "
          + ("within" if worst <= KL_BOUND else "OVER"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
