"""One chat conversation: system prompt, mode, turns; its prompt ids; /save and /load as JSON.

A file given to /load may be anything: it is read field by field, and anything that is not exactly what /save
writes is refused with one line naming the field, so nothing loads that would fail a turn later.

Prompt ids are built piece by piece: the rendered text is split at special tokens (where the tokenizer splits
it anyway) and each text piece is encoded once and cached, so the history tokenizes identically on every turn
and a long conversation costs only its new pieces.
"""

from __future__ import annotations

import json
import re
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quant.errors import BadInput, NotFoundError
from v4cli.prompt.encoding import (
    Assistant,
    Message,
    Mode,
    System,
    ToolCall,
    User,
    render,
    render_conversation,
    stable_prefix,
)

SAVE_FORMAT = 1
_FIELDS = {"file": {"format", "mode", "system", "messages"}, "user": {"role", "content"},
           "assistant": {"role", "content", "reasoning", "tool_calls"}, "tool call": {"name", "arguments"}}
_MAX_DEPTH = 100  # nesting of tool-call arguments: rendering re-serializes them, recursively


class PromptEncoder:
    """Token ids of rendered prompt text, equal to the tokenizer's own ids of the whole text (special tokens
    are matched leftmost-longest, exactly as `tokenizers` extracts added tokens before BPE)."""

    def __init__(self, tokenizer: Any, cache_size: int = 4096):
        added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._tok = tokenizer
        self._special = added
        firsts = "".join(sorted({re.escape(s[0]) for s in added}))
        alts = "|".join(re.escape(s) for s in sorted(added, key=len, reverse=True))
        # the lookahead skips most positions at once: every special token starts with one of a few characters
        self._split = re.compile(f"((?=[{firsts}])(?:{alts}))") if added else None
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._cache_size = cache_size

    def _piece(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._tok.encode(text, add_special_tokens=False).ids
            self._cache[text] = ids
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(text)
        return ids

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, special-token strings included as their ids."""
        if self._split is None:
            return list(self._piece(text))
        out: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                out.append(self._special[part])
            elif part:
                out.extend(self._piece(part))
        return out


@dataclass
class Conversation:
    """The history of one chat: an optional system prompt, the mode, and alternating user/assistant turns."""

    mode: Mode = Mode.HIGH
    system: str | None = None
    turns: list[User | Assistant] = field(default_factory=list)

    def messages(self) -> list[Message]:
        """The messages to render: the system prompt (if any) then the turns."""
        head: list[Message] = [System(self.system)] if self.system else []
        return head + list(self.turns)

    @property
    def awaiting_answer(self) -> bool:
        """True when the last turn is a user message with no answer yet."""
        return bool(self.turns) and isinstance(self.turns[-1], User)

    def add_user(self, text: str) -> None:
        """Append a user message (the next prompt asks the model to answer it)."""
        if self.awaiting_answer:
            raise BadInput("the last user message has no answer yet")
        self.turns.append(User(text))

    def add_answer(self, message: Assistant) -> None:
        """Append the assistant's answer to the last user message."""
        if not self.awaiting_answer:
            raise BadInput("there is no user message to answer")
        self.turns.append(message)

    def drop_unanswered(self) -> None:
        """Forget a trailing user message that got no answer (an interrupted turn)."""
        if self.awaiting_answer:
            self.turns.pop()

    def reset(self) -> None:
        """Forget the turns; the system prompt and mode stay."""
        self.turns.clear()

    # -- prompts --------------------------------------------------------------------------------------------

    def prompt_text(self) -> str:
        """The text to generate the next answer from."""
        return render(self.messages(), self.mode)

    def stable_text(self) -> str:
        """The part of `prompt_text` that every later prompt of this conversation starts with."""
        return stable_prefix(self.messages(), self.mode)

    def history_text(self) -> str:
        """The conversation as later prompts render it (for /tokens)."""
        return render_conversation(self.messages(), self.mode) if self.turns or self.system else ""

    def prompt_ids(self, encoder: PromptEncoder) -> tuple[list[int], int]:
        """(prompt ids, the token count of the stable prefix): what `Session.generate` takes, and its mark."""
        ids = encoder.encode(self.prompt_text())
        return ids, len(encoder.encode(self.stable_text()))

    # -- /save and /load ------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        """A plain JSON object (format 1) that `from_json` reads back."""
        turns = []
        for t in self.turns:
            if isinstance(t, User):
                turns.append({"role": "user", "content": t.content})
            else:
                d: dict[str, Any] = {"role": "assistant", "content": t.content}
                if t.reasoning is not None:
                    d["reasoning"] = t.reasoning
                if t.tool_calls:
                    d["tool_calls"] = [{"name": c.name, "arguments": dict(c.arguments)} for c in t.tool_calls]
                turns.append(d)
        return {"format": SAVE_FORMAT, "mode": self.mode.value, "system": self.system, "messages": turns}

    @classmethod
    def from_json(cls, data: Any, where: str = "conversation") -> Conversation:
        """Read `to_json`'s format; anything else raises BadInput naming the field and what is wrong with it."""
        fmt = data.get("format") if isinstance(data, dict) else None
        if type(fmt) is not int or fmt != SAVE_FORMAT:  # type(): JSON `true` equals 1 in Python
            raise BadInput(f"{where} is not a saved v4 conversation (format {SAVE_FORMAT})",
                           hint="/load reads files written by /save")
        _only(data, "file", where)
        mode = _text(data.get("mode", Mode.HIGH.value), f"{where}: mode")
        try:
            mode = Mode(mode)
        except ValueError:
            raise BadInput(f"{where}: unknown mode {mode!r}", hint=", ".join(m.value for m in Mode)) from None
        system = _text(data.get("system"), f"{where}: system", optional=True)
        messages = data.get("messages", [])
        if not isinstance(messages, list):
            raise BadInput(f"{where}: messages must be a list, not {_kind(messages)}")
        conv = cls(mode=mode, system=system or None)
        for i, m in enumerate(messages):
            at = f"{where}: message {i}"
            if not isinstance(m, dict):
                raise BadInput(f"{at} must be an object, not {_kind(m)}")
            expected = "assistant" if conv.awaiting_answer else "user"
            if m.get("role") != expected:
                raise BadInput(f"{at} should be a {expected} message, not {m.get('role')!r}")
            _only(m, expected, at)
            content = _text(m.get("content", ""), f"{at}: content")
            if expected == "user":
                conv.turns.append(User(content))
                continue
            reasoning = _text(m.get("reasoning"), f"{at}: reasoning", optional=True)
            calls = m.get("tool_calls", [])
            if not isinstance(calls, list):
                raise BadInput(f"{at}: tool_calls must be a list, not {_kind(calls)}")
            conv.turns.append(Assistant(content, reasoning,
                                        tuple(_tool_call(c, f"{at}: tool_calls[{j}]") for j, c in enumerate(calls))))
        if conv.awaiting_answer:  # the next turn would add a second user message in a row
            raise BadInput(f"{where}: message {len(conv.turns) - 1} is a user message with no answer",
                           hint="a saved conversation ends with the assistant's answer")
        return conv

    def save(self, path: Path) -> None:
        """Write the conversation as JSON, atomically (temp file, fsync, rename); BadInput if it cannot be."""
        from v4cli.store import atomic_write_bytes

        path = Path(path)
        if path.is_dir():
            raise BadInput(f"cannot save to {path}: it is a directory", hint="give a file name, e.g. chat.json")
        try:
            data = (json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n").encode()
        except UnicodeEncodeError:
            raise BadInput("the conversation holds text that is not valid Unicode; not saved") from None
        try:
            atomic_write_bytes(path, data)
        except (OSError, ValueError) as e:  # ValueError: a NUL in the name
            raise BadInput(f"cannot save to {path}: {getattr(e, 'strerror', None) or e}") from None

    @classmethod
    def load(cls, path: Path) -> Conversation:
        """Read a file written by `save`; BadInput (one line) for anything else."""
        path = Path(path).expanduser()
        try:
            mode = path.stat().st_mode
            if stat.S_ISDIR(mode):
                raise BadInput(f"cannot load {path}: it is a directory")
            if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
                raise BadInput(f"cannot load {path}: not a regular file")
            raw = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"no such file: {path}") from None
        except (OSError, ValueError) as e:  # ValueError: a NUL in the name
            raise BadInput(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadInput(f"{path} is not UTF-8 text (byte {e.start})",
                           hint="/load reads files written by /save") from None
        except json.JSONDecodeError as e:
            raise BadInput(f"{path} is not JSON ({e})", hint="/load reads files written by /save") from None
        except RecursionError:
            raise BadInput(f"{path} is not a saved v4 conversation (nested too deeply)") from None
        return cls.from_json(data, str(path))


def _kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _only(obj: dict, kind: str, where: str) -> None:
    if extra := sorted(set(obj) - _FIELDS[kind]):
        raise BadInput(f"{where}: unknown field {extra[0]!r} in a {kind}",
                       hint=f"known: {', '.join(sorted(_FIELDS[kind]))}")


def _text(value: Any, what: str, optional: bool = False) -> str | None:
    """`value` if it is a string the tokenizer can take (JSON may spell lone surrogates as \\udXXX escapes)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise BadInput(f"{what} must be a string, not {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadInput(f"{what} is not valid Unicode (a lone surrogate at character {e.start})") from None
    return value


def _json_value(value: Any, what: str, depth: int = 0) -> None:
    """Every string in a tool call's argument value is text; nesting stays renderable."""
    if depth > _MAX_DEPTH:
        raise BadInput(f"{what} is nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, str):
        _text(value, what)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _json_value(v, f"{what}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            _text(k, f"{what} key")
            _json_value(v, f"{what}[{k!r}]", depth + 1)


def _tool_call(call: Any, at: str) -> ToolCall:
    """One saved tool call: an object with a non-empty string name and (optional) an object of arguments."""
    if not isinstance(call, dict):
        raise BadInput(f"{at} must be an object, not {_kind(call)}")
    _only(call, "tool call", at)
    name = _text(call.get("name"), f"{at}.name")
    if not name:
        raise BadInput(f"{at}.name is empty")
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        raise BadInput(f"{at}.arguments must be an object, not {_kind(arguments)}")
    _json_value(arguments, f"{at}.arguments")
    return ToolCall(name, arguments)
