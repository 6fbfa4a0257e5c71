"""`v4 eval`: perplexity and tokens/s of a model over a text or token file; optionally dump the logits."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from v4cli import ui
from v4cli.commands.options import (
    CHUNK, DEVICE, ENGINE, KV, MODEL_POSITIONAL, THREADS, model_option, pick_model,
)
from quant.errors import BadInput


def _read_text(path: Path, flag: str) -> str:
    """The file's text, or BadInput naming the flag and what is wrong (missing, unreadable, not UTF-8)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{flag} {path}: no such file", hint="check the path") from None
    except IsADirectoryError:
        raise BadInput(f"{flag} {path}: a folder, not a file", hint=f"give {flag} one file") from None
    except OSError as e:
        raise BadInput(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise BadInput(f"{flag} {path}: not UTF-8 text (byte {e.start})",
                       hint="convert it to UTF-8, or score token ids with --tokens") from None


def _read_tokens(path: Path) -> list[int]:
    """A JSON list of ints, or ints separated by whitespace/commas."""
    text = _read_text(path, "--tokens")
    try:
        ids = json.loads(text)
    except json.JSONDecodeError:
        ids = text.replace(",", " ").split()
    try:
        return [int(i) for i in ids]
    except (TypeError, ValueError):
        raise BadInput(f"{path}: not a list of token ids") from None


def _save_npy(path: Path, array) -> None:
    """np.save, atomically."""
    import numpy as np

    from v4cli.store import atomic_open

    with atomic_open(path) as f:
        np.save(f, array)


class DraftScore:
    """Running MTP draft statistics: agreement with the model's top-1, and accuracy/NLL against the text."""

    def __init__(self):
        self.n = self.agree = self.scored = self.hit = 0
        self.nll = 0.0

    def add(self, logits, draft, target, skip: int = 0) -> None:
        """Positions of one block; `skip` leading ones (position 0: a draft with no trunk state before it)."""
        import torch

        logits, draft = logits[skip:], draft[skip:]
        target = target[skip:]
        top = draft.argmax(-1)
        self.n += top.numel()
        self.agree += int((top == logits.argmax(-1)).sum())
        m = target.numel()  # the last position of the text has no next token to score against
        self.scored += m
        self.hit += int((top[:m].cpu() == target).sum())
        lp = torch.log_softmax(draft[:m].float(), dim=-1).cpu()
        self.nll -= lp.gather(1, target[:, None]).sum().item()


def eval_cmd(
    model_opt: str | None = model_option("A deepseek4 GGUF file."),
    model: str | None = MODEL_POSITIONAL,
    text: Path = typer.Option(None, "--text", help="Score this text file (tokenized with the model's tokenizer)."),
    tokens: Path = typer.Option(None, "--tokens", help="Score these token ids (JSON list or whitespace-separated)."),
    chunk: int = CHUNK,
    dump_logits: Path = typer.Option(None, "--dump-logits", help="Write all logits [T, vocab] f32 to this .npy."),
    engine: str = ENGINE,
    kv_format: str = KV,
    device: str = DEVICE,
    threads: int | None = THREADS,
    mtp: Path = typer.Option(None, "--mtp", help="Also score this MTP draft file (v4 quantize --mtp): how often "
                             "its drafts match the model's own top token (the speculative acceptance rate)."),
) -> None:
    """Perplexity of MODEL on a text or token file, and prefill tokens/s."""
    import torch

    from v4cli.engine.select import load_engine
    from v4cli.store import find_gguf_model

    name = pick_model(model_opt, model, required="v4 eval -m MODEL.gguf --text FILE")
    if (text is None) == (tokens is None):
        raise BadInput("give exactly one of --text FILE or --tokens FILE")
    # read the input before the model loads: a wrong path should cost a second, not a load
    ids = _read_tokens(tokens) if tokens is not None else None
    source = _read_text(text, "--text") if text is not None else None
    model = find_gguf_model(name)
    with ui.err.status("loading the model"):
        eng = load_engine(model, engine, kv_format=kv_format, device=device, threads=threads, mtp=mtp)
    if ids is None:
        ids = eng.tokenizer.encode(source, add_special_tokens=False).ids
    if len(ids) < 2:
        raise BadInput("need at least 2 tokens to score")
    t0 = time.perf_counter()
    nll, kept, done = 0.0, [], 0
    draft = DraftScore()
    target = torch.as_tensor(ids[1:], dtype=torch.long)
    blocks = eng.iter_draft_logits(ids, chunk) if mtp is not None else ((b, None) for b in eng.iter_logits(ids, chunk))
    with _progress() as bar:
        task = bar.add_task("scoring", total=len(ids))
        for block, draft_block in blocks:
            n = block.shape[0]
            if dump_logits is not None:
                kept.append(block.cpu())
            # logits at position i predict token i+1
            tgt = target[done: done + n]
            lp = torch.log_softmax(block[: tgt.numel()].float(), dim=-1).cpu()
            nll -= lp.gather(1, tgt[:, None]).sum().item()
            if draft_block is not None:
                draft.add(block, draft_block, tgt, skip=1 if done == 0 else 0)
            done += n
            bar.update(task, completed=done, tps=done / (time.perf_counter() - t0))
    secs = time.perf_counter() - t0
    ppl = math.exp(nll / (len(ids) - 1))
    ui.console.print(f"tokens      {len(ids)}")
    ui.console.print(f"perplexity  {ppl:.4f}")
    ui.console.print(f"speed       {len(ids) / secs:.1f} tok/s ({secs:.2f} s, chunk {chunk}, kv {kv_format}, "
                     f"engine {engine})")
    if mtp is not None and draft.n:
        ui.console.print(f"mtp draft   top-1 = model's {100 * draft.agree / draft.n:.2f} % (greedy acceptance), "
                         f"= next token {100 * draft.hit / draft.scored:.2f} %, "
                         f"perplexity {math.exp(draft.nll / draft.scored):.4f} ({draft.n} drafts)")
    if dump_logits is not None:
        _save_npy(dump_logits, torch.cat(kept).numpy())
        ui.console.print(f"logits      {dump_logits}")


class _Speed(ProgressColumn):
    """Tokens scored per second since scoring began (Rich's own speed column averages a short window only)."""

    def render(self, task) -> Text:
        tps = task.fields.get("tps")
        return Text(f"{tps:,.0f} tok/s" if tps else "… tok/s", style="progress.data.speed")


def _progress() -> Progress:
    """Tokens scored of the total, tok/s and ETA on stderr; on a terminal only (stdout stays the results)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                    _Speed(), TimeRemainingColumn(), console=ui.err, transient=True, disable=not sys.stderr.isatty())


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
