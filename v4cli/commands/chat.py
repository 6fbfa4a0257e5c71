"""`v4 chat [-m MODEL]`: an interactive terminal chat that reuses the prefilled prefix from turn to turn."""

from __future__ import annotations

import sys

import typer
from rich.text import Text

from v4cli import ui
from v4cli.commands.options import MODEL, MODEL_POSITIONAL, RemoteOptions, RunOptions, options, pick_model
from quant.errors import V4Error
from v4cli.prompt.encoding import Mode


def _say(line: str, style: str = "dim") -> None:
    # Notes go to stdout on a terminal (they belong to the conversation) and to stderr when piped.
    console = ui.console if ui.console.is_terminal else ui.err
    console.print(Text(line, style=style), soft_wrap=True)


def _error(e: V4Error) -> None:
    # Inside the chat loop a bad command must not end the session: the same line the error boundary prints.
    ui.err.print(Text(ui.error_line(e), style="red"), soft_wrap=True)


@options(run=RunOptions, remote=RemoteOptions)
def chat_cmd(model_opt: str | None = MODEL, model: str | None = MODEL_POSITIONAL, *, run: RunOptions,
             remote: RemoteOptions) -> None:
    """Chat with a model. Type /help for commands; Ctrl-C stops an answer, Ctrl-D leaves."""
    from v4cli.chat import slash
    from v4cli.chat.answer import Chat, InterruptLatch, load_engine, open_session, plan_context
    from v4cli.store import find_gguf_model
    from v4cli.chat.conversation import Conversation, PromptEncoder
    from v4cli.chat.render import StreamView, busy, status_line
    from v4cli.prompt.encoding import check_context

    sampling = run.sampling()
    name = pick_model(model_opt, model)
    if (server := remote.connect(run.ctx, name)) is not None:
        from v4cli.engine.remote import RemoteSession
        from v4cli.ingest import official_tokenizer

        # the same turns, /commands and counts as a local chat: only the model runs elsewhere
        session = RemoteSession(server, lambda: (chat.conversation.messages(), chat.conversation.mode))
        encoder, n_ctx, model_name = PromptEncoder(official_tokenizer()), server.ctx, server.model
        label = f"{server.model} at {server.url}"
    else:
        path = find_gguf_model(name)
        n_ctx = plan_context(path, run.ctx, run.kv_format)
        with busy(ui.err, f"loading {path.name}"):
            eng = load_engine(path, run.engine, run.kv_format, run.device, run.threads, n_ctx)
        session, encoder = open_session(eng, run.chunk, run.cache_size), PromptEncoder(eng.tokenizer)
        model_name = label = path.name
    chat = Chat(session, encoder, Conversation(Mode(run.mode), run.system), sampling, n_ctx, model_name)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    _say(f"{label} · mode {chat.conversation.mode.value} · context {n_ctx:,} tokens · /help for commands")
    if (warning := check_context(run.mode, n_ctx)) is not None:
        _say(warning, style="yellow")

    def read_line(prompt: str) -> str:
        return input(prompt if interactive else "")

    while True:
        try:
            line = slash.read_message(read_line)
        except (EOFError, KeyboardInterrupt):
            if interactive:
                ui.console.print()
            break
        if not line.strip():
            continue
        try:
            inv = slash.parse(line)
            if inv is not None:
                outcome = slash.dispatch(chat, inv)
                for text in outcome.lines:
                    _say(text, style="")
                if outcome.exit:
                    break
                continue
            with InterruptLatch() as latch, StreamView(chat.conversation.mode, ui.console, ui.err,
                                                       run.hide_thinking) as view:
                reply = chat.turn(slash.message_text(line), view.event, view.progress, latch)
            if reply.interrupted:
                _say("[interrupted]", style="yellow")
            _say(status_line(reply, chat.held, chat.ctx))
        except V4Error as e:
            _error(e)


def register(app: typer.Typer) -> None:
    app.command("chat")(chat_cmd)
