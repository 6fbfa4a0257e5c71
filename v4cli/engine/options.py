"""How to run a model, with the defaults declared once: `v4 chat`, `ask`, `eval`, `bench` and `serve` run with
these unless told otherwise, and their command-line flags take their defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from v4cli.model.kvsize import DEFAULT_KV_FORMAT


@dataclass(frozen=True)
class RunDefaults:
    """What every runner shares: which engine, KV format, device, threads, prefill chunk and context."""

    engine: str = "torch"  # our engine; "llama" runs llama.cpp
    kv_format: str = DEFAULT_KV_FORMAT
    device: str = "cpu"
    threads: int | None = None  # the engine's choice
    chunk: int = 256  # prefill tokens per forward pass
    ctx: int | str | None = None  # the largest context that fits this machine


RUN = RunDefaults()
