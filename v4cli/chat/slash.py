"""Chat input: multi-line messages and slash commands, declared as data (name, usage, help, handler).

Handlers act on a `Chat` (v4cli.chat.answer) and return an `Outcome` of plain lines; the command renders them.
A handler either completes or raises BadInput with the chat as it was, so one bad command never ends the chat
or loses the conversation.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from quant.errors import BadInput
from v4cli.prompt.encoding import Mode, check_context

if TYPE_CHECKING:
    from v4cli.chat.answer import Chat

BLOCK = '"""'
CONTINUE = "\\"


def read_message(read_line: Callable[[str], str], prompt: str = ">>> ", more: str = "... ") -> str:
    """One message from the user: a line; a line ending in `\\` continues on the next; a line that is just
    `\"\"\"` opens a block that runs to the next such line. EOFError and KeyboardInterrupt propagate."""
    line = read_line(prompt)
    if line.strip() == BLOCK:
        lines = []
        while (line := read_line(more)).strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith(CONTINUE):
        lines.append(line[: -len(CONTINUE)])
        line = read_line(more)
    lines.append(line)
    return "\n".join(lines)


@dataclass
class Outcome:
    """What a slash command did: lines to show, and whether the chat should end."""

    lines: list[str] = field(default_factory=list)
    exit: bool = False


@dataclass(frozen=True)
class Command:
    """One slash command: `arg` is "none", "optional" or "required"."""

    name: str
    usage: str
    help: str
    arg: str
    handler: Callable[[Chat, str], Outcome]
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Invocation:
    command: Command
    arg: str


# -- handlers ---------------------------------------------------------------------------------------------------


def _mode(chat: Chat, arg: str) -> Outcome:
    if not arg:
        return Outcome([f"mode: {chat.conversation.mode.value}"])
    try:
        mode = Mode(arg.strip().lower())
    except ValueError:
        raise BadInput(f"unknown mode {arg!r}", hint="use /mode non-think, /mode high or /mode max") from None
    chat.conversation.mode = mode
    lines = [f"mode: {mode.value}"]
    if mode is Mode.MAX:
        lines.append(f"Think-Max: context {chat.ctx:,} tokens")
        if (warning := check_context(mode, chat.ctx)) is not None:
            lines.append(warning)
    return Outcome(lines)


def _system(chat: Chat, arg: str) -> Outcome:
    if not arg:
        current = chat.conversation.system
        return Outcome([f"system: {current}" if current else "no system prompt (set one with /system TEXT)"])
    chat.conversation.system = None if arg.strip() == "-" else arg
    return Outcome(["system prompt cleared" if chat.conversation.system is None else "system prompt set"])


def _reset(chat: Chat, arg: str) -> Outcome:
    chat.conversation.reset()
    return Outcome(["conversation cleared (system prompt and mode kept)"])


def _save(chat: Chat, arg: str) -> Outcome:
    path = Path(arg).expanduser()
    chat.conversation.save(path)
    return Outcome([f"saved {len(chat.conversation.turns)} messages to {path}"])


def _load(chat: Chat, arg: str) -> Outcome:
    from v4cli.chat.conversation import Conversation

    path = Path(arg).expanduser()
    chat.conversation = Conversation.load(path)
    c = chat.conversation
    return Outcome([f"loaded {len(c.turns)} messages from {path} (mode {c.mode.value})"])


def _tokens(chat: Chat, arg: str) -> Outcome:
    return Outcome(chat.token_report())


_SETTABLE = {"temperature": float, "top-p": float, "top-k": int, "min-p": float, "seed": int, "max-tokens": int}
_SEEDS = range(2**64)  # what torch.Generator.manual_seed takes


def _set(chat: Chat, arg: str) -> Outcome:
    if not arg:
        s = chat.sampling
        return Outcome([f"temperature {s.temperature}, top-p {s.top_p}, top-k {s.top_k}, min-p {s.min_p}, "
                        f"seed {s.seed}, max-tokens {s.max_tokens}"])
    key, _, value = arg.strip().partition(" ")
    kind = _SETTABLE.get(key.strip())
    if kind is None:
        raise BadInput(f"cannot set {key!r}", hint=f"one of {', '.join(_SETTABLE)}")
    try:
        parsed = kind(value.strip())
    except ValueError:
        raise BadInput(f"{key} needs a {kind.__name__}, got {value.strip()!r}") from None
    # nan passes every range check (all comparisons are false) and an out-of-range seed fails only when sampling
    # starts: both would end the next turn instead of this command
    if (kind is float and not math.isfinite(parsed)) or (key == "seed" and parsed not in _SEEDS):
        raise BadInput(f"{key} cannot be {value.strip()}", hint="a finite number; a seed in [0, 2**64)")
    chat.sampling = replace(chat.sampling, **{key.replace("-", "_"): parsed})
    return Outcome([f"{key} = {parsed}"])


def _help(chat: Chat, arg: str) -> Outcome:
    width = max(len(c.usage) for c in COMMANDS)
    lines = [f"{c.usage:<{width}}  {c.help}" for c in COMMANDS]
    lines += [
        "",
        'Multi-line input: end a line with \\ to continue it, or put """ alone on a line to open and close a block.',
        "Start a message with // to send a line that begins with /.",
        "Ctrl-C while the model answers stops it: a partial answer stays in the conversation; a turn stopped "
        "before any answer text (prefill or reasoning) is dropped. Ctrl-C or Ctrl-D at the prompt exits.",
    ]
    return Outcome(lines)


def _exit(chat: Chat, arg: str) -> Outcome:
    return Outcome(exit=True)


COMMANDS: tuple[Command, ...] = (
    Command("mode", "/mode [non-think|high|max]", "show or switch the thinking mode", "optional", _mode),
    Command("system", "/system [TEXT|-]", "show, set or (with -) clear the system prompt", "optional", _system),
    Command("reset", "/reset", "clear the conversation", "none", _reset),
    Command("save", "/save FILE", "save the conversation as JSON", "required", _save),
    Command("load", "/load FILE", "load a conversation saved with /save", "required", _load),
    Command("tokens", "/tokens", "token counts: conversation, context used, last turn", "none", _tokens),
    Command("set", "/set [KEY VALUE]", "show or change sampling: " + ", ".join(_SETTABLE), "optional", _set),
    Command("help", "/help", "this help", "none", _help, ("?",)),
    Command("exit", "/exit", "leave the chat (also Ctrl-D)", "none", _exit, ("quit",)),
)
_BY_NAME = {n: c for c in COMMANDS for n in (c.name, *c.aliases)}


def parse(line: str) -> Invocation | None:
    """The slash command on `line`, or None when the line is a message (it does not start with one `/`)."""
    text = line.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, _, arg = text[1:].partition(" ")
    arg = arg.strip()
    cmd = _BY_NAME.get(name.lower())
    if cmd is None:
        close = difflib.get_close_matches(name.lower(), list(_BY_NAME), n=1)
        hint = f"did you mean /{close[0]}?" if close else "/help lists the commands"
        raise BadInput(f"unknown command /{name}", hint=hint)
    if cmd.arg == "required" and not arg:
        raise BadInput(f"/{cmd.name} needs an argument", hint=f"usage: {cmd.usage}")
    if cmd.arg == "none" and arg:
        raise BadInput(f"/{cmd.name} takes no argument", hint=f"usage: {cmd.usage}")
    return Invocation(cmd, arg)


def message_text(line: str) -> str:
    """The message a non-command line sends: `//x` sends `/x`."""
    stripped = line.lstrip()
    return stripped[1:] if stripped.startswith("//") else line


def dispatch(chat: Chat, inv: Invocation) -> Outcome:
    """Run a parsed slash command on `chat`; a failure is BadInput (one line) and leaves the chat as it was."""
    try:
        return inv.command.handler(chat, inv.arg)
    except KeyboardInterrupt:
        # Ctrl-C during a slow /load or /save stops the command, not the chat (both change nothing until done)
        raise BadInput(f"/{inv.command.name} interrupted") from None
