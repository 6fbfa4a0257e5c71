"""One chat conversation: system prompt, mode, turns; its prompt ids; /save and /load as JSON.

Prompt ids are built piece by piece: the rendered text is split at special tokens (where the tokenizer splits
it anyway) and each text piece is encoded once and cached, so the history tokenizes identically on every turn
and a long conversation costs only its new pieces.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from v4cli.errors import BadInput, NotFoundError
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
        """Read `to_json`'s format; anything else raises BadInput naming what is wrong."""
        if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
            raise BadInput(f"{where} is not a saved v4 conversation (format {SAVE_FORMAT})")
        try:
            mode = Mode(data.get("mode", Mode.HIGH.value))
        except ValueError:
            raise BadInput(f"{where}: unknown mode {data.get('mode')!r}") from None
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise BadInput(f"{where}: system must be a string")
        conv = cls(mode=mode, system=system or None)
        for i, m in enumerate(data.get("messages", [])):
            role = m.get("role") if isinstance(m, dict) else None
            content = m.get("content", "") if isinstance(m, dict) else None
            if not isinstance(content, str):
                raise BadInput(f"{where}: message {i} has no text content")
            expected = "assistant" if conv.awaiting_answer else "user"
            if role != expected:
                raise BadInput(f"{where}: message {i} should be a {expected} message, not {role!r}")
            if role == "user":
                conv.turns.append(User(content))
            else:
                calls = tuple(ToolCall(c["name"], c.get("arguments", {})) for c in m.get("tool_calls", []))
                conv.turns.append(Assistant(content, m.get("reasoning"), calls))
        return conv

    def save(self, path: Path) -> None:
        """Write the conversation as JSON, atomically."""
        from v4cli.store import atomic_write_bytes

        atomic_write_bytes(Path(path), (json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: Path) -> Conversation:
        """Read a file written by `save`."""
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NotFoundError(f"no such file: {path}") from None
        except OSError as e:
            raise BadInput(f"cannot read {path}: {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path} is not JSON ({e})") from None
        return cls.from_json(data, str(path))
