"""Time to first token with the disk prefix cache: a cold request over a long context, a second request over the
same context from a fresh Session (new process's view: new PrefixCache object, same folder), and one after
editing a late part of the context (only the tail after the last saved boundary is prefilled again).

Usage: python benchmarks/prefix_cache_ttft.py [--gguf PATH] [--tokens 32768] [--kv-format bf16]
       [--mark-every 4096] [--chunk 512] [--edit-at 0.95] [--lookup-tokens 1000000]
Without --gguf a tiny random model (preset `tiny`) is built in a temporary folder. Prints one line per request
(TTFT, tokens prefilled), the ratios, disk bytes per cached token against the KV formula, and the time of a
lookup over a --lookup-tokens prompt with a folder of entries (the per-request cost when nothing is cached).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from v4cli.engine import Engine, SamplingParams, TokenRecord
from v4cli.engine.prefix_cache import _HEADER, PrefixCache
from v4cli.engine.session import Session
from v4cli.model.cache import kv_bytes_per_token
from v4cli.testing.tiny import random_token_ids


def tiny_gguf(folder: Path) -> Path:
    from quant.convert import convert
    from quant.recipes import get_recipe
    from v4cli.testing.tiny import make_tiny_checkpoint

    return convert(make_tiny_checkpoint(folder / "ckpt", preset="tiny"), folder / "tiny.gguf", get_recipe("f32")).path


def ttft(engine: Engine, root: Path, prompt: list[int], marks: list[int], chunk: int) -> tuple[float, int]:
    """Seconds to the first token for `prompt` from a fresh Session over the cache folder, and tokens reused."""
    session = Session(engine, store=PrefixCache.for_engine(engine, max_bytes=10**12, root=root), chunk=chunk)
    t0 = time.perf_counter()
    for rec in session.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1, stop_on_eos=False),
                                marks=marks):
        if isinstance(rec, TokenRecord):
            return time.perf_counter() - t0, session.reused
    raise RuntimeError("no token was generated")


def lookup_cost(n_tokens: int, n_entries: int, folder: Path) -> float:
    """Seconds for a miss over an n_tokens prompt with n_entries saved prefixes of other prompts."""
    pc = PrefixCache(folder, "ef" * 32, 10**12)
    for i in range(n_entries):
        pc.save(random_token_ids(16, seed=i) + [i] * (i * (n_tokens // n_entries)), b"x" * 64)
    prompt = random_token_ids(n_tokens, seed=10**6)
    t0 = time.perf_counter()
    assert pc.lookup(prompt) is None
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--kv-format", default="bf16")
    ap.add_argument("--mark-every", type=int, default=4096, help="file-boundary marks every this many tokens")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--edit-at", type=float, default=0.95, help="where the edit lands, as a share of the context")
    ap.add_argument("--lookup-tokens", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = a.gguf or tiny_gguf(tmp)
        engine = Engine.load(path, kv_format=a.kv_format)
        engine.prefill(random_token_ids(8, seed=0), engine.new_cache())  # first-call warm-up is not the cache's
        root = tmp / "prefix-cache"
        n = a.tokens
        context = random_token_ids(n, seed=1)
        marks = [*range(a.mark_every, n, a.mark_every), n]  # file boundaries, then the end of the context
        q1, q2 = random_token_ids(24, seed=2), random_token_ids(24, seed=3)
        edited = list(context)
        at = int(n * a.edit_at)
        edited[at: at + 8] = random_token_ids(8, seed=4)

        cold, _ = ttft(engine, root, context + q1, marks, a.chunk)
        print(f"cold   : ttft {cold:8.2f} s  prefilled {n + len(q1):,} tokens", flush=True)
        warm, reused = ttft(engine, root, context + q2, marks, a.chunk)
        print(f"warm   : ttft {warm:8.2f} s  prefilled {n + len(q2) - reused:,} tokens (reused {reused:,})", flush=True)
        edit, reused_e = ttft(engine, root, edited + q1, marks, a.chunk)
        print(f"edited : ttft {edit:8.2f} s  prefilled {n + len(q1) - reused_e:,} tokens (reused {reused_e:,}; "
              f"edit at token {at:,})", flush=True)
        print(f"speedup: warm {cold / warm:.1f}x, edited {cold / edit:.1f}x")

        pc = PrefixCache.for_engine(engine, root=root)
        entries = pc.entries()
        biggest = max(entries, key=lambda e: e.n_tokens)
        formula = kv_bytes_per_token(engine.args, a.kv_format)
        print(f"disk   : {len(entries)} entries, {sum(e.size for e in entries):,} bytes; the {biggest.n_tokens:,}-token "
              f"entry is {biggest.size:,} bytes = {biggest.bytes_per_token:.1f} B/token (tokens 4 B/token, header "
              f"{_HEADER.size} B; compressed-KV formula {formula:.1f} B/token for kv {a.kv_format})")
        miss = lookup_cost(a.lookup_tokens, 50, tmp / "lookup")
        print(f"lookup : miss over a {a.lookup_tokens:,}-token prompt with 50 entries up to that long: {miss * 1000:.0f} ms")


if __name__ == "__main__":
    main()
