"""Streaming parser for DeepSeek-V4 output: text deltas in, typed events out.

Generated text looks like `{reasoning}</think>{content}[\\n\\n<｜DSML｜tool_calls>...</｜DSML｜tool_calls>]<EOS>`
(thinking modes start inside the reasoning; non-think starts in the content). The parser holds back any
tail that could be the start of markup, so no think tag, DSML or special token ever reaches a
reasoning/content event, whatever the delta boundaries. Malformed DSML yields what parses plus `ParseError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from v4cli.prompt.encoding import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    LATEST_REMINDER,
    THINK_END,
    THINK_START,
    USER,
    Assistant,
    Mode,
    ToolCall,
)

# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class ReasoningDelta:
    """More reasoning text (thinking modes, before `</think>`)."""

    text: str


@dataclass(frozen=True)
class ContentDelta:
    """More answer text."""

    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """A parsed tool call. `complete` is False when the block ended before `</invoke>` (every parameter
    was closed); `issues` lists tolerated defects (bad JSON kept as text, duplicate keys, ...)."""

    name: str
    arguments: dict[str, Any]
    raw: str
    complete: bool = True
    issues: tuple[str, ...] = ()

    def to_call(self) -> ToolCall:
        """The call as a message part, for the conversation history."""
        return ToolCall(self.name, dict(self.arguments))


@dataclass(frozen=True)
class ParseError:
    """Markup that could not be turned into a tool call; `raw` is kept for debugging, never shown as content."""

    message: str
    raw: str = ""


@dataclass(frozen=True)
class End:
    """The message is over: `reason` is "eos" (the model stopped) or "eof" (the stream ended first)."""

    reason: str


Event = ReasoningDelta | ContentDelta | ToolCallEvent | ParseError | End

# ---------------------------------------------------------------- markup

_DSML_OPEN = f"<{DSML}"
_DSML_CLOSE = f"</{DSML}"
_CANONICAL_BLOCK = f"\n\n<{DSML}tool_calls"
_BLOCK_OPEN = f"<{DSML}tool_calls"
_BLOCK_CLOSE = f"</{DSML}tool_calls"
_INVOKE_OPEN = f"<{DSML}invoke"
_INVOKE_CLOSE = f"</{DSML}invoke"
_PARAM_OPEN = f"<{DSML}parameter"
_PARAM_CLOSE = f"</{DSML}parameter"

# Markers in reasoning/content and what they do. Special tokens that never belong in output are dropped.
_DROP = (BOS, USER, ASSISTANT, LATEST_REMINDER, THINK_START, DSML)
_TEXT_MARKERS = (EOS, THINK_END, _CANONICAL_BLOCK, _DSML_OPEN, _DSML_CLOSE) + _DROP

_LONGEST_TOOL_MARKER = max(len(EOS), len(_INVOKE_CLOSE), len(_BLOCK_CLOSE))

_TAG_NAME_RE = re.compile(r"[A-Za-z_]+")
_NAME_RE = re.compile(r"""\s*name\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_STRING_RE = re.compile(r"""\s*string\s*=\s*(?:"([^"]*)"|'([^']*)')""")

_REASONING, _CONTENT, _TOOLS, _SKIP_TAG, _AFTER_TOOLS, _DONE = range(6)


def _find_marker(buf: str, markers: tuple[str, ...]) -> tuple[int, str | None, int]:
    """(position, marker, hold): the earliest full marker (longest on ties), and where text must be held.

    `hold` is the earliest index whose tail could still grow into a marker that would win over the
    match found (one starting earlier, or at the same place and longer). Text before `hold` is final.
    """
    pos, found = len(buf), None
    for m in markers:
        i = buf.find(m)
        if i != -1 and (found is None or i < pos or (i == pos and len(m) > len(found))):
            pos, found = i, m
    for q in range(max(0, len(buf) - max(map(len, markers)) + 1), min(pos + 1, len(buf))):
        tail = buf[q:]
        for m in markers:
            if len(m) > len(tail) and m.startswith(tail) and (found is None or q < pos or len(m) > len(found)):
                return pos, found, q
    return pos, found, len(buf)


def _decode_value(raw: str, flag: str | None) -> tuple[Any, str | None]:
    """A parameter value: raw text for string="true", JSON otherwise (falling back to the raw text)."""
    if flag == "true":
        return raw, None
    try:
        return json.loads(raw), None
    except ValueError:
        pass
    if flag is None:
        return raw, None  # no flag: a bare word is most likely a string
    return raw, f"value is not JSON, kept as text: {raw[:40]!r}"


def parse_invoke(raw: str, complete: bool) -> ToolCallEvent | ParseError:
    """Parse one `<｜DSML｜invoke ...>...` segment (with or without its closing tag)."""
    header_end = raw.find(">")
    name_match = _NAME_RE.match(raw, len(_INVOKE_OPEN), header_end if header_end != -1 else len(raw))
    if header_end == -1 or name_match is None:
        return ParseError("tool call without a readable name", raw)
    name = name_match.group(1) if name_match.group(1) is not None else name_match.group(2)
    args: dict[str, Any] = {}
    issues: list[str] = []
    pos = header_end + 1
    body_end = raw.find(_INVOKE_CLOSE, pos)
    body_end = len(raw) if body_end == -1 else body_end
    while True:
        start = raw.find(_PARAM_OPEN, pos, body_end)
        stray = raw[pos : body_end if start == -1 else start].strip()
        if stray:
            issues.append(f"ignored text between parameters: {stray[:40]!r}")
        if start == -1:
            break
        tag_end = raw.find(">", start, body_end)
        close = raw.find(_PARAM_CLOSE, tag_end + 1 if tag_end != -1 else start, body_end)
        if tag_end == -1 or close == -1:
            # A parameter cut off mid-value: its value is unknown, so the call cannot be trusted.
            return ParseError(f"tool call {name!r} was cut off inside a parameter", raw)
        attrs = raw[start + len(_PARAM_OPEN) : tag_end]
        key_match = _NAME_RE.match(attrs)
        if key_match is None:
            issues.append("parameter without a name dropped")
        else:
            key = key_match.group(1) if key_match.group(1) is not None else key_match.group(2)
            flag_match = _STRING_RE.match(attrs, key_match.end())
            flag = None
            if flag_match is not None:
                flag = flag_match.group(1) if flag_match.group(1) is not None else flag_match.group(2)
            value, issue = _decode_value(raw[tag_end + 1 : close], flag)
            if issue:
                issues.append(f"{key}: {issue}")
            if key in args:
                issues.append(f"duplicate parameter {key!r}: last value kept")
            args[key] = value
        close_end = raw.find(">", close, body_end)
        pos = body_end if close_end == -1 else close_end + 1
    if not complete:
        issues.append("tool call block ended before </invoke>")
    return ToolCallEvent(name=name, arguments=args, raw=raw, complete=complete, issues=tuple(issues))


class StreamParser:
    """Feed text deltas with `feed`, call `finish` when the stream ends; both return new events."""

    def __init__(self, mode: Mode):
        self.mode = Mode(mode)
        self._state = _REASONING if self.mode.thinking else _CONTENT
        self._buf = ""
        self._scan = 0  # leading chars of a waiting tool block already searched for closing markers
        self._clean = False  # waiting inside an invoke, no closing marker anywhere in `_buf`
        self._window = ""  # the last few chars of the tool block while `_clean`
        self._pending: list[str] = []  # deltas not yet appended to `_buf` (see `feed`)
        self._return_to = self._state
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[ToolCallEvent] = []

    # -- public

    def feed(self, delta: str) -> list[Event]:
        """Consume one text delta; returns the events it completes."""
        if self._state == _DONE or not delta:
            return []
        if self._clean:
            # Inside a long tool argument with no closing marker yet: only the new text and a short tail
            # can complete one, so queue the delta instead of re-growing one big string per token.
            window = self._window + delta
            if not any(m in window for m in (_INVOKE_CLOSE, _BLOCK_CLOSE, EOS)):
                self._pending.append(delta)
                self._window = window[-_LONGEST_TOOL_MARKER:]
                return []
        self._buf += "".join(self._pending) + delta
        self._pending.clear()
        self._clean = False
        out: list[Event] = []
        self._run(out)
        return out

    def finish(self) -> list[Event]:
        """End of stream: flush held text, settle an unterminated tool block, and emit `End`."""
        if self._state == _DONE:
            return []
        out: list[Event] = []
        self._buf += "".join(self._pending)
        self._pending.clear()
        self._run(out)
        if self._state in (_REASONING, _CONTENT) and self._buf:
            held, self._buf = self._buf, ""
            if held.strip() == "" or held == "<":
                self._emit_text(held, out)
            else:
                out.append(ParseError("stream ended inside markup", held))
        elif self._state == _TOOLS:
            self._close_block(out)
        self._state = _DONE
        out.append(End("eof"))
        return out

    @property
    def done(self) -> bool:
        """True once `End` has been emitted."""
        return self._state == _DONE

    def message(self) -> Assistant:
        """The assistant turn parsed so far, ready to go back into the conversation history."""
        return Assistant(
            content="".join(self._content),
            reasoning="".join(self._reasoning) if self.mode.thinking else None,
            tool_calls=tuple(c.to_call() for c in self._calls),
        )

    # -- states

    def _run(self, out: list[Event]) -> None:
        while self._buf and self._state != _DONE:
            before = (self._state, len(self._buf))
            if self._state in (_REASONING, _CONTENT):
                self._step_text(out)
            elif self._state == _TOOLS:
                self._step_tools(out)
            elif self._state == _SKIP_TAG:
                # A stray closing tag: drop its name and ">", keep whatever follows.
                name = _TAG_NAME_RE.match(self._buf)
                n = name.end() if name else 0
                if n < len(self._buf):
                    self._state = self._return_to
                    n += self._buf[n] == ">"
                self._buf = self._buf[n:]
            elif self._state == _AFTER_TOOLS:
                stripped = self._buf.lstrip()
                self._buf = stripped
                if stripped:
                    self._state = _CONTENT
            if (self._state, len(self._buf)) == before:
                return  # waiting for more text

    def _emit_text(self, text: str, out: list[Event]) -> None:
        if not text:
            return
        if self._state == _REASONING:
            self._reasoning.append(text)
            out.append(ReasoningDelta(text))
        else:
            self._content.append(text)
            out.append(ContentDelta(text))

    def _step_text(self, out: list[Event]) -> None:
        pos, marker, hold = _find_marker(self._buf, _TEXT_MARKERS)
        if marker is None or hold < pos:
            self._emit_text(self._buf[:hold], out)
            self._buf = self._buf[hold:]
            return
        self._emit_text(self._buf[:pos], out)
        rest = self._buf[pos + len(marker) :]
        if marker == EOS:
            self._buf = ""
            self._state = _DONE
            out.append(End("eos"))
        elif marker == THINK_END:
            self._buf = rest
            if self._state == _REASONING:
                self._state = _CONTENT
        elif marker in (_CANONICAL_BLOCK, _DSML_OPEN):
            # A tool block; a missing </think> before it just ends the reasoning.
            self._buf = marker.lstrip("\n") + rest
            self._state = _TOOLS
        elif marker == _DSML_CLOSE:
            self._return_to = self._state
            self._buf = rest
            self._state = _SKIP_TAG
        else:
            self._buf = rest  # a special token that never belongs in the text

    def _step_tools(self, out: list[Event]) -> None:
        eos = self._buf.find(EOS, self._scan)
        if eos == -1:
            if self._drain_tools(out) and self._state == _TOOLS:
                # Nothing that ends an invoke or the block so far: later searches start near the end, so a
                # long parameter value (a whole file) streams in linear time.
                self._scan = max(0, len(self._buf) - _LONGEST_TOOL_MARKER)
                self._window = self._buf[-_LONGEST_TOOL_MARKER:]
                self._clean = True
            return
        # Parse only up to the EOS; text after a closed block goes back to the content path.
        tail = self._buf[eos:]
        self._consume(self._buf[:eos])
        self._drain_tools(out)
        if self._state == _TOOLS:
            self._close_block(out)
            self._state = _DONE
            out.append(End("eos"))
        else:
            self._buf += tail

    def _consume(self, rest: str) -> None:
        self._buf = rest
        self._scan = 0
        self._clean = False

    def _drain_tools(self, out: list[Event]) -> bool:
        """Parse complete tags and invokes; True when it stopped inside an invoke with no closing tag yet."""
        while True:
            buf = self._buf.lstrip()
            if len(buf) != len(self._buf):
                self._consume(buf)
            if not buf:
                return False
            if buf.startswith((_BLOCK_OPEN, _BLOCK_CLOSE)):
                end = buf.find(">")
                if end == -1:
                    return False
                self._consume(buf[end + 1 :])
                if buf.startswith(_BLOCK_CLOSE):
                    self._state = _AFTER_TOOLS
                    return False
                continue
            if buf.startswith(_INVOKE_OPEN):
                close = buf.find(_INVOKE_CLOSE, self._scan)
                block_close = buf.find(_BLOCK_CLOSE, self._scan)
                if block_close != -1 and (close == -1 or block_close < close):
                    # The block closed around an unfinished invoke.
                    self._add_call(parse_invoke(buf[:block_close], complete=False), out)
                    self._consume(buf[block_close:])
                    continue
                end = buf.find(">", close) if close != -1 else -1
                if end == -1:
                    return close == -1
                self._add_call(parse_invoke(buf[: end + 1], complete=True), out)
                self._consume(buf[end + 1 :])
                continue
            if any(t.startswith(buf) for t in (_BLOCK_OPEN, _BLOCK_CLOSE, _INVOKE_OPEN)):
                return False  # could still become a tag
            nxt = min((i for i in (buf.find(_DSML_OPEN, 1), buf.find(_DSML_CLOSE, 1)) if i != -1), default=-1)
            if nxt == -1:
                return False  # the garbage may end at a later tag, or with the stream
            out.append(ParseError("unexpected text in a tool call block", buf[:nxt]))
            self._consume(buf[nxt:])

    def _close_block(self, out: list[Event]) -> None:
        buf = self._buf.strip()
        self._consume("")
        if not buf:
            return
        if buf.startswith(_INVOKE_OPEN):
            self._add_call(parse_invoke(buf, complete=False), out)
        elif any(t.startswith(buf) or buf.startswith(t) for t in (_BLOCK_OPEN, _BLOCK_CLOSE)):
            pass  # a lone (partial) block tag carries nothing
        else:
            out.append(ParseError("unexpected text in a tool call block", buf))

    def _add_call(self, event: ToolCallEvent | ParseError, out: list[Event]) -> None:
        if isinstance(event, ToolCallEvent):
            self._calls.append(event)
        out.append(event)


def parse_completion(text: str, mode: Mode) -> tuple[Assistant, list[Event]]:
    """Parse a whole generated text at once (same result as streaming it)."""
    parser = StreamParser(mode)
    events = parser.feed(text) + parser.finish()
    return parser.message(), events


def merge_deltas(events: list[Event]) -> list[Event]:
    """Join consecutive reasoning/content deltas: the chunking-independent view of an event stream."""
    merged: list[Event] = []
    for e in events:
        if merged and isinstance(e, (ReasoningDelta, ContentDelta)) and type(merged[-1]) is type(e):
            merged[-1] = type(e)(merged[-1].text + e.text)  # type: ignore[union-attr]
        else:
            merged.append(e)
    return merged
