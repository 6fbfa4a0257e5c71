"""The options `v4 chat` and `v4 ask` share, declared once (defaults included) and used by both signatures."""

from __future__ import annotations

import typer

from v4cli.engine.prefix_cache import DEFAULT_CACHE_SIZE
from v4cli.engine.sampling import SamplingParams
from v4cli.prompt.encoding import Mode

DEFAULT_MAX_TOKENS = 32_768  # also ask's answer reserve: the context budget keeps this much room for the answer

MODE = typer.Option(Mode.HIGH, "--mode", case_sensitive=False,
                    help="Thinking mode: non-think (answer at once), high (reason first), max (Think-Max).")
TEMPERATURE = typer.Option(1.0, "--temperature", min=0.0, help="Sampling temperature (0 = greedy; model card: 1.0).")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (model card: 1.0).")
TOP_K = typer.Option(0, "--top-k", min=0, help="Keep the k most likely tokens (0 = off).")
MIN_P = typer.Option(0.0, "--min-p", help="Drop tokens below this fraction of the top probability.")
SEED = typer.Option(None, "--seed", help="Sampling seed, for reproducible answers.")
MAX_TOKENS = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", min=1,
                          help="Most tokens to generate per answer (reasoning included).")
KV_FORMAT = typer.Option("bf16", "--kv-format", help="KV cache storage: bf16, fp8 or f32.")
DEVICE = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda.")
ENGINE = typer.Option("torch", "--engine", help="Inference engine: torch or llama (llama.cpp).")
THREADS = typer.Option(None, "--threads", min=1, help="CPU threads (default: the engine's choice).")
CTX = typer.Option(None, "--ctx", "--context",
                   help="Context length, like 64K or 1M (default: the largest that fits this machine).")
HIDE_THINKING = typer.Option(False, "--hide-thinking", help="Do not show the reasoning, only the answer.")
CHUNK = typer.Option(256, "--chunk", min=1, help="Prefill chunk size in tokens.")
CACHE_SIZE = typer.Option(DEFAULT_CACHE_SIZE, "--cache-size",
                          help="Disk limit for saved prompt states (prefix cache); 0 turns it off.")
SYSTEM = typer.Option(None, "--system", help="System prompt.")


def sampling(temperature: float, top_p: float, top_k: int, min_p: float, seed: int | None,
             max_tokens: int) -> SamplingParams:
    """SamplingParams from the shared flags (it validates them: BadInput on nonsense)."""
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                          max_tokens=max_tokens)
