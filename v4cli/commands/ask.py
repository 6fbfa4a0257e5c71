"""`v4 ask PATH... QUESTION`: answer a question about files, directories and/or stdin in one shot."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

import typer
from rich.text import Text

from v4cli import ui
from v4cli.commands.options import MODEL, RemoteOptions, RunOptions, options
from quant.errors import BadInput, NotFoundError, V4Error
from v4cli.prompt.encoding import Mode, System, User

STDIN_ARG = "-"


def _read_stdin(explicit: bool) -> str | None:
    """stdin's text when `-` was given or something is piped in; None when it is a terminal and not asked for."""
    if not explicit and sys.stdin.isatty():
        return None
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    text = data.decode("utf-8", "replace")
    return text if text.strip() else None


def _tokenizer_and_ctx(model: str | None, ctx: str | None, kv_format: str, dry_run: bool):
    """(model path or None, tokenizer, context) from the GGUF header only. A dry run with no model given and none
    to be found falls back to the official tokenizer and the requested (or maximum) context."""
    from v4cli.chat.answer import plan_context
    from v4cli.store import find_gguf_model
    from v4cli.engine.detok import tokenizer_from_metadata
    from v4cli.gguf_file import open_gguf
    from v4cli.ingest import MAX_CONTEXT, official_tokenizer
    from v4cli.units import parse_ctx

    try:
        path = find_gguf_model(model)
    except (NotFoundError, BadInput):
        if model or not dry_run:
            raise
        return None, official_tokenizer(), parse_ctx(ctx) if ctx else MAX_CONTEXT
    with open_gguf(path) as gf:
        tokenizer = tokenizer_from_metadata(gf.metadata)
        n_ctx = (parse_ctx(ctx) if ctx else min(gf.args.max_position_embeddings, MAX_CONTEXT)) if dry_run else None
    if n_ctx is None:
        n_ctx = plan_context(path, ctx, kv_format)
    return path, tokenizer, n_ctx


@options(run=RunOptions, remote=RemoteOptions)
def ask_cmd(
    args: list[str] = typer.Argument(..., metavar="PATH... QUESTION",
                                     help="Files and directories to read (`-` = stdin), then the question."),
    model: str | None = MODEL,
    include: list[str] = typer.Option([], "--include", help="Only files matching this glob (gitignore syntax)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Leave out files matching this glob (gitignore syntax)."),
    max_file_tokens: int = typer.Option(100_000, "--max-file-tokens", min=1,
                                        help="Cut any file to this many tokens (its head is kept)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the token tree and exclusions; load no model."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON record: answer, reasoning, usage, timings."),
    *,
    run: RunOptions,
    remote: RemoteOptions,
) -> None:
    """Answer QUESTION about PATHs and/or stdin (`cat f | v4 ask "q"`, `v4 ask - src/ "q"`).

    Directories follow .gitignore; binaries and secrets are skipped. Over the token budget, the error lists the
    largest files and directories.
    """
    params = dict(locals())
    try:
        _ask(**params)
    except KeyboardInterrupt:
        # Typer turns Ctrl-C into a *returned* 130 when not standalone, which cli.main drops: exit here instead
        ui.err.print("interrupted")
        sys.exit(130)


def _ask(args, model, include, exclude, max_file_tokens, dry_run, json_out, run: RunOptions,
         remote: RemoteOptions) -> None:
    from v4cli.chat.answer import Reply, ask_marks, load_engine, open_session, run_turn, wrap_ids
    from v4cli.chat.conversation import PromptEncoder
    from v4cli.chat.render import StreamView, busy, dry_run_lines, status_line
    from v4cli.ingest import IngestOptions, build_context
    from v4cli.prompt.encoding import MAX_MIN_CONTEXT, check_context

    mode, max_tokens = Mode(run.mode), run.max_tokens
    question = args[-1].strip()
    if not question or question == STDIN_ARG:
        raise BadInput("the last argument must be the question", hint='v4 ask PATH... "question"')
    if os.path.lexists(args[-1]):
        # a forgotten question would otherwise turn the last path into the question
        raise BadInput(f"the last argument {args[-1]!r} is a path, not a question", hint='v4 ask PATH... "QUESTION"')
    paths = args[:-1]
    stdin = _read_stdin(explicit=STDIN_ARG in paths)
    paths = [p for p in paths if p != STDIN_ARG]
    if not paths and stdin is None:
        raise BadInput("nothing to read", hint='pass files or directories, or pipe text: cat f | v4 ask "question"')
    sampling = run.sampling()

    if (server := remote.connect(run.ctx, model)) is not None:
        from v4cli.ingest import official_tokenizer

        # the remote's context length is the budget; the prompt is counted with V4's own tokenizer
        path, tokenizer, n_ctx = None, official_tokenizer(), server.ctx
    else:
        path, tokenizer, n_ctx = _tokenizer_and_ctx(model, run.ctx, run.kv_format, dry_run)
    if max_tokens >= n_ctx:
        raise BadInput(f"--max-tokens {max_tokens:,} leaves no room for the context in {n_ctx:,} tokens",
                       hint="lower --max-tokens or raise --ctx")
    encoder = PromptEncoder(tokenizer)
    head, tail = wrap_ids(encoder, mode, run.system)
    options = IngestOptions(include=tuple(include), exclude=tuple(exclude), max_file_tokens=max_file_tokens,
                            context_limit=n_ctx, answer_reserve=max_tokens)
    with ui.byte_progress(transient=True) as bar:  # bytes of text, speed, ETA
        task = bar.add_task("tokenizing", total=None)
        context = build_context(paths, tokenizer, question=question, stdin=stdin, options=options,
                                extra_tokens=len(head) + len(tail), enforce_budget=not dry_run,
                                allow_empty=dry_run,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    ui.err.print(Text(context.summary(len(head) + len(tail)), style="dim"), soft_wrap=True)
    if dry_run:
        report = context.report()
        extra = len(head) + len(tail)
        report = replace(report, other=[*report.other, ("prompt format", extra)],
                         total_tokens=report.total_tokens + extra)
        if json_out:
            sys.stdout.write(json.dumps(report.to_json(), ensure_ascii=False) + "\n")
            return
        for line in dry_run_lines(report):
            ui.console.print(line, markup=False, highlight=False, soft_wrap=True)
        return

    if mode is Mode.MAX:
        ui.err.print(Text(f"Think-Max: context {n_ctx:,} tokens, answer reserve {max_tokens:,} "
                          f"(it asks for at least {MAX_MIN_CONTEXT:,})", style="dim"), soft_wrap=True)
        if (warning := check_context(mode, n_ctx)) is not None:
            ui.err.print(Text(warning, style="yellow"), soft_wrap=True)
    if server is not None:
        from v4cli.engine.remote import RemoteSession

        # the same layout as a local prompt (head + context + tail), sent as the messages it was rendered from
        messages = ([System(run.system)] if run.system else []) + [User(context.text)]
        make_session, name = lambda: RemoteSession(server, lambda: (messages, mode)), server.model
    else:
        with busy(ui.err, f"loading {path.name}"):
            eng = load_engine(path, run.engine, run.kv_format, run.device, run.threads, n_ctx)
        # made inside the try below: a cache that cannot be allocated is a generation failure
        make_session, name = lambda: open_session(eng, run.chunk, run.cache_size), path.name
    ids = head + context.ids + tail
    marks = [m for m in ask_marks(len(head), context.pieces) if m < len(ids)]
    reply = Reply(mode)
    view = StreamView(mode, ui.console, ui.err, run.hide_thinking)
    try:
        with view:  # Ctrl-C propagates: the error boundary exits 130
            run_turn(make_session(), ids, sampling, reply, marks,
                     None if json_out else view.event, view.progress)
    except (RuntimeError, MemoryError) as e:
        raise V4Error(f"generation failed: {e}") from e
    if json_out:
        sys.stdout.write(json.dumps(reply.to_json(name), ensure_ascii=False) + "\n")
    else:
        ui.err.print(Text(status_line(reply), style="dim"), soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("ask")(ask_cmd)
