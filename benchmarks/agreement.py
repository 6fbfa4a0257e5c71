"""How close are the cheaper forms of the model to the exact one? KV formats and weight recipes, through our engine.

Rows: fp8 KV vs bf16 KV (lossless weights), bf16 KV vs f32 KV, and each weight recipe (q8, q4k, q2k-q3k, q2k) vs
lossless (bf16 KV) — top-1 agreement of the next-token argmax and the mean/p99 KL(reference ‖ candidate) over
every position of held-out text, plus the KV bytes/token each format actually held.

Random weights make these figures meaningless (flat distributions, knife-edge routing: see
v4cli/testing/trained.py), so by default the model is the tiny checkpoint *trained* for a few minutes on this
package's own source (built once, cached under --work). `--weights random` shows the contrast.

    python benchmarks/agreement.py [--work /tmp/v4-agreement] [--tokens 1024] [--steps 200] [--weights trained]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant.convert import convert  # noqa: E402
from quant.recipes import get_recipe  # noqa: E402
from v4cli.engine import Engine  # noqa: E402
from v4cli.model.kvsize import bytes_per_token as kv_bytes_per_token  # noqa: E402
from quant.config import FLASH_CONFIG, ModelArgs  # noqa: E402
from v4cli.testing.tiny import make_tiny_checkpoint  # noqa: E402
from v4cli.testing.trained import train_tiny  # noqa: E402


def compare(ref: torch.Tensor, cand: torch.Tensor) -> dict:
    """Top-1 agreement and KL(ref ‖ cand) per position, from [T, V] logits."""
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(cand.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return {"top1": (ref.argmax(-1) == cand.argmax(-1)).double().mean().item(),
            "kl_mean": kl.mean().item(), "kl_p99": torch.quantile(kl, 0.99).item()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/v4-agreement"))
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens scored")
    ap.add_argument("--steps", type=int, default=200, help="training steps for the trained checkpoint")
    ap.add_argument("--weights", choices=("trained", "random"), default="trained")
    ap.add_argument("--recipes", default="q8,q4k,q2k-q3k,q2k")
    ap.add_argument("--chunk", type=int, default=128)
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.weights == "trained":
        ckpt = train_tiny(a.work / f"tiny-trained-{a.steps}", steps=a.steps)
        held = torch.load(ckpt / "held_out_ids.pt").tolist()[: a.tokens]
    else:
        ckpt = make_tiny_checkpoint(a.work / "tiny-random", preset="tiny")
        from v4cli.testing.tiny import random_token_ids

        held = random_token_ids(a.tokens, seed=1)

    def gguf(recipe: str) -> Path:
        out = a.work / f"{ckpt.name}-{recipe}.gguf"
        return out if out.exists() else convert(ckpt, out, get_recipe(recipe)).path

    def logits(recipe: str, kv: str) -> tuple[torch.Tensor, float]:
        eng = Engine.load(gguf(recipe), kv_format=kv)
        cache = eng.new_cache()
        t0 = time.perf_counter()
        out = torch.cat(list(eng.iter_logits(held, a.chunk, cache)))
        print(f"  {recipe:>8} kv={kv:<4} {len(held) / (time.perf_counter() - t0):7.0f} tok/s", file=sys.stderr)
        return out, cache.bytes_per_token()

    lossless = {kv: logits("lossless", kv) for kv in ("f32", "bf16", "fp8")}
    rows = [("bf16 KV vs f32 KV", compare(lossless["f32"][0], lossless["bf16"][0])),
            ("fp8 KV vs bf16 KV", compare(lossless["bf16"][0], lossless["fp8"][0]))]
    for r in [r for r in a.recipes.split(",") if r]:
        rows.append((f"{r} vs lossless (bf16 KV)", compare(lossless["bf16"][0], logits(r, "bf16")[0])))

    ref = lossless["bf16"][0]
    top = torch.softmax(ref.double(), -1).max(-1).values
    print(f"\nmodel: {ckpt.name} ({a.weights} weights), {len(held)} held-out tokens, chunk {a.chunk}; "
          f"reference top-1 probability median {statistics.median(top.tolist()):.3f}")
    print(f"{'comparison':<30} {'top-1 agree':>12} {'KL mean':>10} {'KL p99':>10}")
    for name, r in rows:
        print(f"{name:<30} {100 * r['top1']:>11.2f}% {r['kl_mean']:>10.5f} {r['kl_p99']:>10.5f}")
    flash = ModelArgs.from_config(FLASH_CONFIG)
    print("\nKV bytes/token held (compressed entries, this model) and the formula at Flash dims:")
    for kv in ("f32", "bf16", "fp8"):
        print(f"  {kv:<5} {lossless[kv][1]:8.1f} B/token   Flash {kv_bytes_per_token(flash, kv):8.1f} B/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
