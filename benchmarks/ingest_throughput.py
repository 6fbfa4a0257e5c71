"""Ingestion throughput for `v4 ask`: collection, layout, tokenization over a generated ~1M-token tree.

Usage: python benchmarks/ingest_throughput.py [--tokens 1000000] [--git] [--seed 0]
Prints one line per stage: files, tokens, seconds, tokens/s.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

from v4cli import ingest

WORDS = ["request", "response", "handler", "config", "client", "server", "cache", "buffer", "token", "index", "value", "result", "error", "stream", "batch", "layer", "weight", "tensor", "shape", "offset", "length", "count", "total", "parse", "render", "load", "store", "write", "read", "open", "close", "start", "stop", "update", "create", "delete", "user", "session", "model", "engine", "worker", "queue", "event", "state", "context", "prompt", "path", "file"]
TYPES = ["int", "str", "float", "bool", "list[int]", "dict[str, int]", "bytes", "None"]


def ident(rng: random.Random, n: int = 2) -> str:
    return "_".join(rng.choice(WORDS) for _ in range(rng.randint(1, n)))


def python_file(rng: random.Random, n_funcs: int) -> str:
    """A plausible Python module: imports, a class, functions with docstrings, comments and literals."""
    out = [f'"""{ident(rng, 3).replace("_", " ").capitalize()} utilities for the {ident(rng)} layer."""', ""]
    out += [f"import {rng.choice(['os', 're', 'json', 'time', 'math', 'typing'])}" for _ in range(rng.randint(1, 4))]
    out += ["", "", f"class {ident(rng).title().replace('_', '')}:", f'    """Holds the {ident(rng)} state."""', ""]
    for _ in range(n_funcs):
        name, args = ident(rng, 3), [ident(rng) for _ in range(rng.randint(0, 3))]
        sig = ", ".join(f"{a}: {rng.choice(TYPES)}" for a in args)
        out.append(f"def {name}({sig}) -> {rng.choice(TYPES)}:")
        out.append(f'    """Return the {ident(rng)} for {ident(rng)}; raises if {ident(rng)} is missing."""')
        for _ in range(rng.randint(2, 10)):
            kind = rng.random()
            var = ident(rng)
            if kind < 0.3:
                out.append(f"    {var} = {rng.randint(0, 100000)} * {rng.random():.4f}")
            elif kind < 0.5:
                out.append(f'    {var} = "{ident(rng, 4).replace("_", " ")}"')
            elif kind < 0.7:
                out.append(f"    # {ident(rng, 5).replace('_', ' ')}: keep {ident(rng)} in sync with {ident(rng)}")
            elif kind < 0.85:
                out.append(f"    if {var} is None or len({ident(rng)}) > {rng.randint(1, 4096)}:")
                out.append(f"        raise ValueError(f\"bad {{{var}!r}} in {ident(rng)}\")")
            else:
                out.append(f"    for {var} in range({rng.randint(1, 64)}):")
                out.append(f"        {ident(rng)}[{var}] += {ident(rng)}.get({var}, 0)")
        out.append(f"    return {ident(rng)}")
        out += ["", ""]
    return "\n".join(out) + "\n"


def generate(root: Path, target_tokens: int, rng: random.Random) -> None:
    """Write Python files into nested packages until about `target_tokens` (4 bytes a token estimate)."""
    budget = target_tokens * 4
    written = 0
    i = 0
    while written < budget:
        pkg = root / f"pkg{i % 7}" / f"sub{i % 5}"
        pkg.mkdir(parents=True, exist_ok=True)
        text = python_file(rng, rng.randint(5, 60))
        (pkg / f"{ident(rng)}_{i}.py").write_text(text)
        written += len(text.encode())
        i += 1
    (root / ".gitignore").write_text("*.log\nbuild/\n")


def line(stage: str, files: int, tokens: int, seconds: float) -> None:
    rate = tokens / seconds if seconds > 0 else float("inf")
    print(f"{stage:<22} files {files:>6}  tokens {tokens:>10,}  seconds {seconds:8.3f}  tokens/s {rate:>14,.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--git", action="store_true", help="make the tree a git repo (collection via git ls-files)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tok = ingest.official_tokenizer()
    t = time.perf_counter()
    plain = ingest.plain_tokenizer(tok)
    print(f"plain tokenizer derived in {time.perf_counter() - t:.2f} s; "
          f"RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')}, cpus {os.cpu_count()}")

    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "tree"
        root.mkdir()
        generate(root, args.tokens, random.Random(args.seed))
        if args.git:
            subprocess.run(["git", "init", "-q"], cwd=root, check=True)

        t = time.perf_counter()
        coll = ingest.collect([root], base=root)
        t_collect = time.perf_counter() - t
        files = sorted(coll.files, key=lambda f: (f.mtime_ns, f.path))

        t = time.perf_counter()
        texts = [ingest.render_tree(f.path for f in files)] + [ingest.render_block(f.path, f.text) for f in files]
        whole = "".join(texts)
        t_layout = time.perf_counter() - t

        t = time.perf_counter()
        ids = ingest._encode(plain, texts)
        t_tok = time.perf_counter() - t
        n = sum(map(len, ids))

        t = time.perf_counter()
        whole_ids = ingest._encode(plain, [whole])[0]
        t_whole = time.perf_counter() - t
        assert whole_ids == [i for x in ids for i in x], "piece tokens do not sum to the whole"

        t = time.perf_counter()
        ctx = ingest.build_context([root], tok, base=root, question="What does this code do?",
                                   enforce_budget=False)
        t_all = time.perf_counter() - t

        nf = len(files)
        line("collect", nf, n, t_collect)
        line("layout (render)", nf, n, t_layout)
        line("tokenize (batch)", nf, n, t_tok)
        line("tokenize (whole once)", nf, n, t_whole)
        line("build_context total", nf, ctx.n_tokens, t_all)
        print(f"bytes {len(whole.encode()):,}; bytes/token {len(whole.encode()) / n:.2f}; "
              f"exact piece sum: {ctx.exact_pieces}")


if __name__ == "__main__":
    main()
