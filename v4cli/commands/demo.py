"""`v4 demo`: the whole pipeline on an embedded tiny model, no download needed."""

from __future__ import annotations

import time

import typer

from v4cli import ui


def demo(
    prompt: str = typer.Option("Where is authentication handled in a web app?", "--prompt", "-p",
                               help="What to ask the tiny model."),
    recipe: str = typer.Option("q8", "--recipe", help="Quantize recipe for the demo GGUF."),
    max_tokens: int = typer.Option(24, "--max-tokens", help="Tokens to generate."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
) -> None:
    """Build a tiny random-weight V4 checkpoint in the official layout, quantize it, and answer a prompt."""
    from quant.convert import convert
    from quant.recipes import get_recipe
    from v4cli.store import Store
    from v4cli.testing.tiny import make_tiny_checkpoint

    ui.console.print("[bold yellow]This is a demo on a TINY RANDOM-WEIGHT model[/]: the pipeline is real "
                     "(official checkpoint layout → GGUF → engine), the answer is noise.")
    root = Store().demo_dir
    t0 = time.perf_counter()
    ckpt = make_tiny_checkpoint(root / "tiny-checkpoint")
    # soft_wrap here and below: paths and figures stay on one line whatever the terminal's width
    ui.console.print(f"checkpoint  {ckpt}  (official layout: FP8 + E8M0 scales, FP4 experts, "
                     f"{time.perf_counter() - t0:.1f} s)", soft_wrap=True)
    out = root / f"tiny-{recipe}.gguf"
    r = get_recipe(recipe)
    if not out.exists():
        res = convert(ckpt, out, r, source_repo="v4-demo/tiny")
        ui.console.print(f"quantized   {out}  ({res.tensors} tensors, recipe {r.name}, {res.seconds:.1f} s)",
                         soft_wrap=True)
    else:
        ui.console.print(f"quantized   {out}  (cached)", soft_wrap=True)
    _answer(out, prompt, max_tokens, seed)
    _next_steps(out)


def _answer(gguf, prompt: str, max_tokens: int, seed: int) -> None:
    from v4cli.engine import Engine, SamplingParams
    from v4cli.engine.records import DoneRecord
    from v4cli.prompt.encoding import Mode, PromptTokenizer, User, encode

    t0 = time.perf_counter()
    engine = Engine.load(gguf)  # builds the CPU kernels on first use, so the timings below never include it
    ui.console.print(f"loaded      {gguf.name}  ({time.perf_counter() - t0:.1f} s, not counted below)")
    ids = encode([User(prompt)], Mode.NON_THINK, tokenizer=PromptTokenizer(engine.tokenizer))
    ui.console.print(f"prompt      {prompt!r} ({len(ids)} tokens, non-think mode)", soft_wrap=True,
                     markup=False, highlight=False)  # the user's text is not Rich markup
    ui.console.print("answer      ", end="")
    for rec in engine.generate(ids, SamplingParams(max_tokens=max_tokens, seed=seed)):
        ui.console.print(rec.text, end="", markup=False, highlight=False)
        if isinstance(rec, DoneRecord):
            t = rec.timings
            ui.console.print(f"\n[dim]{t.prompt_tokens} prompt tokens, prefill {t.prefill_s:.2f} s = "
                             f"{t.prefill_tps:.0f} tok/s, decode {t.decode_tps:.1f} tok/s, "
                             f"finish: {rec.finish_reason}[/]", soft_wrap=True)


def _next_steps(gguf) -> None:
    """What to try next: the demo's model is in the store, and the default of chat/ask while nothing else is."""
    name = gguf.stem
    steps = (("v4 chat", f"talk to {name}: the default while the store holds no other model"),
             ('v4 ask . "what is this?"', "ask about a folder, read whole as context"),
             ("v4 ls", f"the store lists it; v4 rm {name} removes it"),
             ("v4 pull flash", "the real model (160 GB); then v4 quantize flash --fit 128G"))
    for i, (cmd, why) in enumerate(steps):
        ui.console.print(f"{'' if i else 'next':<12}{cmd:<26}{why}", soft_wrap=True, markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(demo)
