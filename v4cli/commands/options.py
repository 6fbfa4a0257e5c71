"""Flags that several commands share, each declared once: its names, default, help and parser.

Like simonw/llm's option-group decorators: `@options(run=RunOptions)` adds every field of `RunOptions` to a command's
signature as its flag and hands the command one `RunOptions`, so `chat` and `ask` (and anything else that loads and
runs a model) spell the run flags in one place. Single flags (`MODEL`, `RAM`, `VRAM`, `CTX`, `KV`, ...) are objects the
commands put in their signatures. Sizes and contexts are parsed here, by v4cli.units, so every command reads `1M` and
`64G` the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

import typer

from v4cli.engine.options import RUN
from v4cli.engine.prefix_cache import DEFAULT_CACHE_SIZE
from v4cli.engine.remote import API_KEY_ENV
from v4cli.engine.sampling import SamplingParams
from quant.errors import BadInput
from v4cli.prompt.encoding import Mode
from v4cli.units import parse_ctx, parse_size

# Old spellings still accepted everywhere so scripts keep working; help shows only the new names. cli.py hands this
# to click as token_normalize_func, which maps option names both where they are declared and where they are typed.
OLD_SPELLINGS = {"gpu-mem": "vram", "cpu-mem": "ram", "kv-format": "kv", "context": "ctx"}


def normalize_flag(name: str) -> str:
    """click's token normalizer: an old flag name (without its dashes) → the current one."""
    return OLD_SPELLINGS.get(name, name)


# ---------------------------------------------------------------------------------------------- single flags

def model_option(help: str) -> Any:
    """-m/--model, the one way every command names its model (help says what kinds of name it takes)."""
    return typer.Option(None, "--model", "-m", help=help)


MODEL = model_option("A GGUF path or store name (default: $V4_MODEL, else the store's only GGUF).")
# `v4 chat MODEL`, `v4 info PATH` and `v4 plan MODEL` predate -m and still work (cheap to keep; scripts use them)
MODEL_POSITIONAL = typer.Argument(None, metavar="MODEL", help="Same as -m MODEL.")


def pick_model(option: str | None, positional: str | None, required: str | None = None) -> str | None:
    """The model named by -m or by the positional; both, when they disagree, is a mistake worth stopping on.
    `required`, for commands that need one, is the command line the hint shows when neither is given."""
    if option is not None and positional is not None and option != positional:
        raise BadInput(f"two models named: -m {option} and {positional}", hint="name the model once, with -m")
    name = option if option is not None else positional
    if name is None and required is not None:
        raise BadInput("no model named", hint=required)
    return name


def ctx_option(default: int | str | None, help: str) -> Any:
    """--ctx, read by parse_ctx (1M, 384K, 65536) wherever it appears; a default like "1M" reads the same way."""
    return typer.Option(default, "--ctx", parser=parse_ctx, metavar="TOKENS", help=help)


def kv_option(default: str, choices: str) -> Any:
    """--kv: running takes a concrete format, planning also `auto`; the name is the same."""
    return typer.Option(default, "--kv", help=f"KV cache format: {choices}.")


CTX = ctx_option(RUN.ctx, "Context length, like 64K or 1M (default: the largest that fits).")
RAM = typer.Option(None, "--ram", parser=parse_size, metavar="SIZE",
                   help="RAM to plan for, e.g. 128G (default: this machine's).")
VRAM = typer.Option(None, "--vram", parser=parse_size, metavar="SIZE",
                    help="GPU memory to plan for, e.g. 24G; 0 for CPU only (default: this machine's).")


# ---------------------------------------------------------------------------------------------- option groups


def _flag(info: Any) -> Any:
    """A dataclass field whose default is the flag's and whose metadata carries the flag itself."""
    return dataclasses.field(default=info.default, metadata={"flag": info})


# single flags the groups below use, and commands that take only some of them (bench, eval, imatrix) use directly
ENGINE = typer.Option(RUN.engine, "--engine", help="Inference engine: torch or llama (llama.cpp).")
KV = kv_option(RUN.kv_format, "bf16, fp8 or f32")
DEVICE = typer.Option(RUN.device, "--device", help="torch device, e.g. cpu or cuda.")
THREADS = typer.Option(RUN.threads, "--threads", min=1, help="CPU threads (default: the engine's choice).")
CHUNK = typer.Option(RUN.chunk, "--chunk", min=1, help="Prefill chunk size in tokens.")
CACHE_SIZE = typer.Option(DEFAULT_CACHE_SIZE, "--cache-size",
                          help="Disk limit for saved prompt states (prefix cache); 0 turns it off.")


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How a command loads a GGUF to run it: `v4 eval`, and through RunOptions `v4 chat` and `v4 ask`."""

    engine: str = _flag(ENGINE)
    kv_format: str = _flag(KV)
    device: str = _flag(DEVICE)
    threads: int | None = _flag(THREADS)
    chunk: int = _flag(CHUNK)


@dataclasses.dataclass(frozen=True)
class RunOptions(LoadOptions):
    """LoadOptions, and how to talk to the model and sample its answer: the flags of `v4 chat` and `v4 ask`."""

    mode: Mode = _flag(typer.Option(
        Mode.HIGH, "--mode", case_sensitive=False,
        help="Thinking mode: non-think (answer at once), high (reason first), max (Think-Max)."))
    system: str | None = _flag(typer.Option(None, "--system", help="System prompt."))
    temperature: float = _flag(typer.Option(
        SamplingParams.temperature, "--temperature", min=0.0,
        help="Sampling temperature (0 = greedy; model card: 1.0)."))
    top_p: float = _flag(typer.Option(SamplingParams.top_p, "--top-p", help="Nucleus sampling mass (model card: 1.0)."))
    top_k: int = _flag(typer.Option(SamplingParams.top_k, "--top-k", min=0,
                                    help="Keep the k most likely tokens (0 = off)."))
    min_p: float = _flag(typer.Option(SamplingParams.min_p, "--min-p",
                                      help="Drop tokens below this fraction of the top probability."))
    seed: int | None = _flag(typer.Option(None, "--seed", help="Sampling seed, for reproducible answers."))
    # not SamplingParams' 512: a reasoning answer needs room; also ask's answer reserve in the context budget
    max_tokens: int = _flag(typer.Option(
        32_768, "--max-tokens", min=1, help="Most tokens to generate per answer (reasoning included)."))
    ctx: int | None = _flag(CTX)
    hide_thinking: bool = _flag(typer.Option(False, "--hide-thinking",
                                             help="Do not show the reasoning, only the answer."))
    cache_size: str = _flag(CACHE_SIZE)

    def sampling(self) -> SamplingParams:
        """SamplingParams from these flags (it validates them: BadInput on nonsense)."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              seed=self.seed, max_tokens=self.max_tokens)


@dataclasses.dataclass(frozen=True)
class RemoteOptions:
    """`--remote URL`: `v4 chat` and `v4 ask` run the model on an OpenAI-compatible server (v4cli.engine.remote)
    instead of loading a GGUF; --ctx then caps the context the server reports."""

    remote: str | None = _flag(typer.Option(
        None, "--remote", metavar="URL",
        help="Run on an OpenAI-compatible server (v4 serve, vLLM, SGLang, DeepSeek's API), e.g. http://gpu:8000."))
    remote_model: str | None = _flag(typer.Option(
        None, "--remote-model", metavar="NAME", help="Model to ask the remote for (default: the first it lists)."))
    # OPENAI_API_KEY is not read, so a key meant for OpenAI is never sent to another host
    api_key: str | None = _flag(typer.Option(
        None, "--api-key", envvar=API_KEY_ENV, show_envvar=True, show_default=False,
        help="API key for --remote."))

    def connect(self, ctx: int | None, model: str | None = None):
        """The Remote to run on (RemoteError if it is down or refuses the key), or None without --remote.
        `model` is a local model also named (-m), which --remote leaves nothing to do."""
        if self.remote is None:
            if self.remote_model is not None:
                raise BadInput("--remote-model needs --remote URL")
            return None
        if model is not None:
            raise BadInput(f"-m {model} names a local model, and --remote runs the remote's",
                           hint="drop -m; --remote-model NAME picks among the remote's models")
        from v4cli.engine.remote import Remote

        return Remote.connect(self.remote, self.remote_model, self.api_key, ctx)


def options(**groups: type) -> Callable[[Callable], Callable]:
    """Decorator: each `name=Group` adds the group's flags to the command's signature (after its own parameters) and
    passes the command one `Group` instance as `name`. Typer reads the signature, so help lists the flags as usual."""

    def decorate(func: Callable) -> Callable:
        hints = typing.get_type_hints(func)
        own = [p.replace(annotation=hints.get(name, p.annotation))
               for name, p in inspect.signature(func).parameters.items() if name not in groups]
        taken = {p.name for p in own}
        added = []
        for group in groups.values():
            group_hints = typing.get_type_hints(group)
            for f in dataclasses.fields(group):
                if f.name in taken:  # two groups (or a group and the command) cannot both own a flag
                    raise TypeError(f"{func.__name__}: flag parameter {f.name!r} declared twice")
                taken.add(f.name)
                added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.metadata["flag"],
                                               annotation=group_hints[f.name]))

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            for name, group in groups.items():
                kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(group)})
            return func(**kwargs)

        params = [*own, *added]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
