"""Prefix reuse across requests: earlier turns this server generated are re-rendered to the exact tokens it sampled.

Agents resend the whole conversation every request. The engine's cache (live, snapshots, disk prefix cache) is
keyed by token ids, so request 2 reuses request 1's work only if the history re-renders to the ids the cache
holds: request 1's prompt ids, then the ids the model sampled. Three things break that if the client's copy of the
assistant turn is rendered as sent:

- the reasoning: clients drop or reformat `reasoning_content`, and thinking mode with tools renders it back;
- the DSML: the client re-serializes `arguments` (`{"a": 1}` for `{"a":1}`), and canonical DSML may not be what
  the model wrote (spacing, attribute order) anyway;
- the tokens: re-tokenizing the sampled text need not give the sampled ids (BPE merges two tokens the model
  sampled apart; on the tiny random model 12 of 20 answers re-tokenize differently), and reuse stops at the
  first differing id.

So `History` remembers every generated turn — its exact reasoning, its exact answer text (content + DSML) and its
sampled ids — under a key made of what a client sends back, normalized, chained with the conversation before it:

- content with leading/trailing whitespace stripped (clients trim; inner whitespace is kept, so a different answer
  is a different key);
- each tool call as (name, JSON of the parsed arguments with sorted keys and no spaces) — not the argument
  string's formatting, and not call ids (clients may mint their own);
- not the reasoning (clients drop or rewrite it);
- the earlier messages (each normalized the same way), so the same short answer ("Done.") or the same call
  (`read_file{"path": "a.py"}`) in two conversations — parallel subagents — never swaps in the other's reasoning.

`prepare` swaps each matching assistant turn for one that renders to the exact sampled text; a turn the server
did not generate (or forgot) renders as usual. `encode` turns the prepared messages into ids, splicing in the
sampled ids where the turn's text decodes from them exactly. Snapshots: `marks` (see its docstring).

With a `path` (`for_session`: next to the model's disk prefix cache entries), every remembered turn is also
appended to a JSON-lines file and read back at start, so after a restart a resent history still renders to the
ids the disk prefix cache saved — without it, the first generated turn of the history would re-render without
its reasoning and with re-tokenized text, and the disk cache would cover only the prompt up to that turn. The
file is rewritten (compacted) once it holds twice what memory keeps. Two servers sharing it may lose each other's
latest lines at a compaction: that costs reuse, never a wrong prompt (a lost turn renders as the client sent it).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from quant.errors import V4Warning
from v4cli.prompt.encoding import (
    EOS,
    EOS_ID,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    Assistant,
    Message,
    Mode,
    System,
    ToolResult,
    User,
    keeps_reasoning,
    render,
)

MAX_ENTRIES = 256
# Characters (and ids) held across all entries: a 1M-token agent transcript of generated turns is a few MB of text,
# so this keeps many long conversations while bounding a server that runs for weeks.
MAX_CHARS = 64 << 20
FILE_NAME = "serve-history.jsonl"
_KEY = re.compile(r"[0-9a-f]{64}")


class HistoryWarning(V4Warning):
    """The history file could not be read or written: reuse after a restart is lost, serving goes on."""


@dataclass(frozen=True)
class Turn:
    """One generated turn as sampled: reasoning (None in non-think mode), answer (content + DSML), sampled ids."""

    reasoning: str | None
    answer: str
    ids: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return len(self.reasoning or "") + len(self.answer) + len(self.ids)


def _canonical_args(arguments: Any) -> str:
    try:
        return json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(arguments)


def _normalized(msg: Message) -> str:
    """What identifies a message as a client sends it back (see the module docstring)."""
    if isinstance(msg, Assistant):
        calls = [(c.name, _canonical_args(dict(c.arguments))) for c in msg.tool_calls]
        return json.dumps(["assistant", (msg.content or "").strip(), calls], ensure_ascii=False)
    if isinstance(msg, ToolResult):
        return json.dumps(["tool", msg.content], ensure_ascii=False)
    kind = "system" if isinstance(msg, System) else "user"
    return json.dumps([kind, getattr(msg, "content", repr(msg))], ensure_ascii=False)


def _keys(messages: Sequence[Message]) -> list[str | None]:
    """For each message: its key if it is an assistant turn (the chained hash up to and including it), else None."""
    h = hashlib.sha256()
    out: list[str | None] = []
    for msg in messages:
        h.update(_normalized(msg).encode())
        h.update(b"\x00")
        out.append(h.copy().hexdigest() if isinstance(msg, Assistant) else None)
    return out


def split_raw(raw: str, thinking: bool) -> tuple[str | None, str]:
    """(reasoning, answer) of a sampled text: in a thinking mode everything up to the first `</think>` is
    reasoning (all of it when the turn stopped before one); EOS, never part of a rendered answer, is dropped."""
    if raw.endswith(EOS):
        raw = raw[: -len(EOS)]
    if not thinking:
        return None, raw
    reasoning, sep, answer = raw.partition(THINK_END)
    return reasoning, answer if sep else ""


class History:
    """The generated turns of recent requests (LRU, bounded in count and size); thread-safe."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_chars: int = MAX_CHARS, path: Path | None = None):
        self.max_entries, self.max_chars = max_entries, max_chars
        self._turns: OrderedDict[str, Turn] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self.hits = 0  # assistant turns swapped for their exact form (for tests and /health)
        self.spliced = 0  # turns whose sampled ids went into a prompt as they were sampled
        self.path = Path(path) if path is not None else None
        self._lines = 0  # lines in the file, to know when to compact it
        if self.path is not None:
            self._load()

    @classmethod
    def for_session(cls, session: Any, **kw) -> History:
        """A History kept next to the session's disk prefix cache entries (this model's folder), so a restarted
        server reuses them; in memory only when the session has no disk cache (`--cache-size 0`)."""
        folder = getattr(getattr(session, "store", None), "folder", None)
        return cls(path=Path(folder) / FILE_NAME if folder is not None else None, **kw)

    # -- the file ----------------------------------------------------------------------------------------------

    def _load(self) -> None:
        bad = 0
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    self._lines += 1
                    item = _parse_line(line)
                    if item is None:
                        bad += 1
                    else:
                        self._put_memory(*item)
        except FileNotFoundError:
            return
        except OSError as e:
            warnings.warn(HistoryWarning(f"cannot read {self.path}: {e}; earlier turns will not be reused"))
            return
        if bad:
            warnings.warn(HistoryWarning(f"{self.path}: skipped {bad} unreadable line(s)"))

    def _append(self, key: str, turn: Turn) -> None:
        if self.path is None:
            return
        try:
            if self._lines + 1 > 2 * max(len(self._turns), 1) + 16:
                self._compact()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(_line(key, turn))
                self._lines += 1
        except OSError as e:
            warnings.warn(HistoryWarning(f"cannot write {self.path}: {e}; this turn is reused until a restart only"))

    def _compact(self) -> None:
        from v4cli.store import atomic_open

        with atomic_open(self.path) as f:
            f.write("".join(_line(k, t) for k, t in self._turns.items()).encode())
        self._lines = len(self._turns)

    def __len__(self) -> int:
        return len(self._turns)

    # -- remembering -------------------------------------------------------------------------------------------

    def remember(self, req: Any, result: Any, ids: Sequence[int] | None = None) -> None:
        """Keep the turn `result` generated for `req` (a ChatRequest): `result.raw` split into reasoning and answer,
        and `ids`, the sampled token ids, if the caller collected them (EOS, if last, is dropped: rendering
        writes it as text and it is never fed back)."""
        thinking = Mode(req.mode).thinking
        reasoning, answer = split_raw(result.raw, thinking)
        toks = tuple(ids or ())
        if toks and toks[-1] == EOS_ID:
            toks = toks[:-1]
        key = _keys([*req.messages, result.message])[-1]
        self._put(key, Turn(reasoning, answer, toks))

    def _put(self, key: str, turn: Turn) -> None:
        with self._lock:
            if self._put_memory(key, turn):
                self._append(key, turn)

    def _put_memory(self, key: str, turn: Turn) -> bool:
        old = self._turns.pop(key, None)
        if old is not None:
            self._chars -= old.size
        if turn.size > self.max_chars:
            return False
        self._turns[key] = turn
        self._chars += turn.size
        while len(self._turns) > self.max_entries or self._chars > self.max_chars:
            _, gone = self._turns.popitem(last=False)
            self._chars -= gone.size
        return True

    def _get(self, key: str | None) -> Turn | None:
        if key is None:
            return None
        with self._lock:
            turn = self._turns.get(key)
            if turn is not None:
                self._turns.move_to_end(key)
            return turn

    # -- using -------------------------------------------------------------------------------------------------

    def _matches(self, messages: Sequence[Message]) -> list[Turn | None]:
        return [self._get(k) for k in _keys(messages)]

    def prepare(self, messages: Sequence[Message], mode: Mode | str | None = None,
                tools: Sequence[Mapping[str, Any]] | None = None) -> list[Message]:
        """`messages` with each assistant turn this server generated replaced by its exact sampled form: the
        reasoning it produced (rendered where the format keeps it) and its exact answer text. The visible content
        and parsed calls stay the client's, so preparing twice is the same as once. (`mode` and `tools` do not
        change what is swapped; they are taken so every caller passes the same triple to prepare and encode.)"""
        out, turns = self._prepare(messages)
        self.hits += sum(t is not None for t in turns)
        return out

    def _prepare(self, messages: Sequence[Message]) -> tuple[list[Message], list[Turn | None]]:
        out = list(messages)
        turns = self._matches(out)
        for i, turn in enumerate(turns):
            if turn is not None:
                out[i] = replace(out[i], reasoning=turn.reasoning, exact=turn.answer)
        return out, turns

    def encode(self, messages: Sequence[Message], mode: Mode | str, tools: Sequence[Mapping[str, Any]] | None,
               encoder: Any, tokenizer: Any) -> list[int]:
        """Token ids of `render(prepare(messages), mode, tools)`: each remembered turn's sampled ids spliced in
        where they decode to exactly the text rendered for it, the rest encoded by `encoder` (`.encode(text)`);
        `tokenizer.decode(ids, skip_special_tokens=False)` checks the splice.

        Splitting the encoding there is exact: a rendered answer starts right after a think tag and ends right
        before EOS, both special tokens, and the tokenizer splits at special tokens before BPE."""
        mode = Mode(mode)
        prepared, turns = self._prepare(messages)
        text = render(prepared, mode, tools or None)
        keep = keeps_reasoning(mode, tools or None)
        later_user = [False] * len(prepared)
        seen = False
        for i in range(len(prepared) - 1, -1, -1):
            later_user[i] = seen
            seen = seen or isinstance(prepared[i], (User, ToolResult))
        ids: list[int] = []
        cursor = 0
        for i, turn in enumerate(turns):
            if turn is None or not turn.ids:
                continue
            # what render wrote for this turn (render_conversation: reasoning where kept, then the answer)
            with_reasoning = mode.thinking and (keep or not later_user[i])
            body = ((turn.reasoning or "") + THINK_END if with_reasoning else "") + turn.answer
            at = text.find(body + EOS, cursor)
            if at < 0 or not text.endswith((THINK_START, THINK_END), 0, at):
                continue  # not where a turn starts: leave it to the encoder
            spliced = self._splice(body, turn, with_reasoning, encoder, tokenizer)
            if spliced is None:
                continue
            ids += encoder.encode(text[cursor:at]) + spliced
            cursor = at + len(body)
            self.spliced += 1
        return ids + encoder.encode(text[cursor:])

    @staticmethod
    def _splice(body: str, turn: Turn, with_reasoning: bool, encoder: Any, tokenizer: Any) -> list[int] | None:
        """Ids for `body` that use the sampled ids, or None when they do not decode to it."""
        sampled = list(turn.ids)
        if turn.reasoning is not None and not with_reasoning:
            # sampled in a thinking mode, rendered without its reasoning: the answer's ids follow `</think>`
            end = encoder.encode(THINK_END)
            if len(end) != 1 or end[0] not in sampled:
                return None
            sampled = sampled[sampled.index(end[0]) + 1:]
        if not sampled:
            return None
        text = tokenizer.decode(sampled, skip_special_tokens=False)
        if text == body:
            return sampled
        # the turn stopped before `</think>` (render adds it) or was sampled without reasoning and is now rendered
        # with an empty one (render adds `</think>` before it): the rest starts or ends at a special token
        if body.startswith(text) and body[len(text):].startswith(SPECIAL_TOKENS):
            return sampled + encoder.encode(body[len(text):])
        if body.endswith(text) and body[: len(body) - len(text)].endswith(SPECIAL_TOKENS):
            return encoder.encode(body[: len(body) - len(text)]) + sampled
        return None

    @staticmethod
    def marks(ids: Sequence[int]) -> list[int]:
        """Where the Session should snapshot for this prompt: one token short of its end.

        Every later request of the conversation starts with this prompt minus its last token (the think tag: in
        thinking mode without tools the next request renders `</think>` there, having dropped the reasoning), so a
        snapshot there (RAM and disk prefix cache) lets the next request restore the whole prompt even after a
        restart, when the live cache — which also holds the generated turn — is gone. In RAM the live cache
        already reaches past it: the generated ids are fed back as they are sampled (all but the last one), and
        `encode` puts those same ids into the next prompt."""
        return [len(ids) - 1] if len(ids) > 1 else []


def _line(key: str, turn: Turn) -> str:
    return json.dumps({"key": key, "reasoning": turn.reasoning, "answer": turn.answer, "ids": list(turn.ids)},
                      ensure_ascii=False) + "\n"


def _parse_line(line: bytes) -> tuple[str, Turn] | None:
    """(key, turn) from one line of the file, or None for anything this module did not write."""
    try:
        d = json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is one
        return None
    if not isinstance(d, dict):
        return None
    key, reasoning, answer, ids = d.get("key"), d.get("reasoning"), d.get("answer"), d.get("ids")
    if not (isinstance(key, str) and _KEY.fullmatch(key) and isinstance(answer, str)
            and (reasoning is None or isinstance(reasoning, str)) and isinstance(ids, list)
            and all(type(i) is int and 0 <= i < 1 << 32 for i in ids)):
        return None
    return key, Turn(reasoning, answer, tuple(ids))
