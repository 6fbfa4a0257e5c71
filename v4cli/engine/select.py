"""Pick an inference engine by name: our torch `Engine` or llama.cpp's `LlamaEngine`, same interface."""

from __future__ import annotations

from pathlib import Path

from quant.errors import BadInput
from v4cli.engine.options import RUN

ENGINES = ("torch", "llama")


def load_engine(path: str | Path, engine: str = RUN.engine, kv_format: str = RUN.kv_format,
                device: str = RUN.device, threads: int | None = None, mtp: str | Path | None = None,
                ctx: int | None = None, **llama_options):
    """Load `path` with the named engine. `threads` also sets torch's intra-op threads for the torch engine;
    `mtp` (torch engine) also loads an MTP draft file; `ctx`: the context to make room for (llama.cpp sizes its
    cache up front, the torch engine's placement plan reserves GPU memory for it).

    `llama_options` (flash_attn, ...) go to `LlamaEngine.load` only.
    """
    if engine == "torch":
        import torch

        from v4cli.engine.generate import Engine

        if threads:
            torch.set_num_threads(threads)
        return Engine.load(path, kv_format=kv_format, device=device, mtp=mtp, ctx=ctx)
    if engine == "llama":
        from v4cli.engine.llama import LlamaEngine

        if mtp is not None:
            raise BadInput("the MTP draft runs in the torch engine", hint="drop --mtp, or use --engine torch")
        if device != "cpu":
            raise BadInput(f"the llama engine runs on its own backends, not torch device {device!r}",
                           hint="drop --device, or use --engine torch")
        if ctx:
            llama_options["n_ctx"] = ctx
        return LlamaEngine.load(path, kv_format=kv_format, n_threads=threads, **llama_options)
    raise BadInput(f"unknown engine {engine!r} (choices: {', '.join(ENGINES)})", hint="pass --engine torch or llama")
