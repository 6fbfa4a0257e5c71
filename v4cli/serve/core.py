"""The contract between the HTTP APIs of `v4 serve` and the one engine behind them.

Every API module turns its request body into one `ChatRequest` (typed messages from `v4cli.prompt.encoding`,
function tools, a thinking mode, sampling, an optional decoding constraint) and turns the runner's event stream
back into its own JSON or SSE shapes. The stream is the parser's events (`ReasoningDelta`, `ContentDelta`,
`ToolCallEvent`; `ParseError`s are kept out of content), `TokenLogprobs` when asked for, and one final `Result`.
Nothing here knows HTTP, so the three APIs cannot drift apart in what they send to the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from v4cli.engine.grammar import Constraint
from v4cli.engine.sampling import SamplingParams
from v4cli.prompt.encoding import Assistant, Message, Mode
from v4cli.prompt.parser import ContentDelta, ParseError, ReasoningDelta, ToolCallEvent

# OpenAI's reasoning_effort (and the Anthropic/Responses equivalents mapped onto it) → V4 thinking mode.
EFFORT_MODES = {
    "none": Mode.NON_THINK, "minimal": Mode.NON_THINK, "low": Mode.NON_THINK,
    "medium": Mode.HIGH, "high": Mode.HIGH,
    "xhigh": Mode.MAX, "max": Mode.MAX,
}


@dataclass
class ChatRequest:
    """One generation, whichever API it came through."""

    model: str
    messages: list[Message]
    mode: Mode
    sampling: SamplingParams
    tools: list[Mapping[str, Any]] = field(default_factory=list)  # {"name", "description", "parameters"} each
    constraint: Constraint | None = None
    logprobs: int | None = None  # None: off; N ≥ 0: the sampled token's logprob and the N most likely others
    stream: bool = False


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's text and log-probability, with the `top` alternatives as (text, logprob)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens restored from RAM or the disk prefix cache, not prefilled
    completion_tokens: int


@dataclass(frozen=True)
class Result:
    """The end of one generation: why it stopped, counts, the parsed message and the exact sampled text.

    finish_reason: "stop" (end of turn or a stop string), "length", "tool_calls" (the turn ended with calls) or
    "cancelled" (the client went away). `raw` is the text as sampled, DSML and reasoning included, so a later
    request that sends this turn back can be re-rendered byte for byte (see history.py)."""

    finish_reason: Literal["stop", "length", "tool_calls", "cancelled"]
    usage: Usage
    message: Assistant
    raw: str
    ttft_s: float = 0.0
    decode_tps: float = 0.0
    stop_sequence: str | None = None  # the stop string that ended it (Anthropic reports it); None at end of turn


Event = ReasoningDelta | ContentDelta | ToolCallEvent | ParseError | TokenLogprobs | Result
