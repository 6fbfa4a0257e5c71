"""What `v4 chat` and `v4 ask` share below the terminal: find the model, check it fits, load it, build prompt ids,
and run one turn through a `Session`, turning engine records into parser events and a `Reply`.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from quant.errors import BadInput
from v4cli.engine.options import RUN
from v4cli.prompt.encoding import Assistant, Mode, User, render
from v4cli.prompt.parser import Event, ParseError, StreamParser, ToolCallEvent

ASK_MARK_GAP = 4096  # tokens between ask's file-boundary snapshots: a restart after an edit re-prefills less
# an interrupted long prefill resumes from the last multiple of this (each save replaces the previous one)
SAVE_EVERY = 65536

# ---------------------------------------------------------------------------------------------- the model


def plan_context(path: Path, ctx: int | str | None, kv_format: str) -> int:
    """The context to run at: `ctx`, checked to fit this machine, or the largest that fits (DoesNotFit when
    none does). Runs before loading, so a model that cannot fit fails in a second with the fix named."""
    from v4cli.planning.plan import check_fits

    return check_fits(path, ctx=ctx, kv_format=kv_format).ctx


def load_engine(path: Path, engine: str = RUN.engine, kv_format: str = RUN.kv_format, device: str = RUN.device,
                threads: int | None = None, ctx: int | None = None):
    """Load the GGUF with the named engine (torch or llama, see v4cli.engine.select), with room for `ctx`."""
    from v4cli.engine.select import load_engine as select_engine

    return select_engine(path, engine=engine, kv_format=kv_format, device=device, threads=threads, ctx=ctx)


# ---------------------------------------------------------------------------------------------- one turn


class InterruptLatch:
    """Ctrl-C while tokens stream sets `requested`, so the turn stops at the next token with the session's cache
    intact; Ctrl-C before the first token (prefill) or a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.requested = False
        self.decoding = False
        self._previous: Any = None

    def _handle(self, signum, frame) -> None:
        if self.decoding and not self.requested:
            self.requested = True
            return
        raise KeyboardInterrupt

    def __enter__(self) -> InterruptLatch:
        self.requested = self.decoding = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


@dataclass
class Reply:
    """One answer as it streams and once done: parsed text, tool calls, token counts and timings."""

    mode: Mode
    prompt_tokens: int = 0
    reused_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "eos", "length", "stop", or "interrupted"
    interrupted: bool = False
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    tool_calls: list[ToolCallEvent] = field(default_factory=list)
    errors: list[ParseError] = field(default_factory=list)
    parser: StreamParser | None = None

    def __post_init__(self) -> None:
        if self.parser is None:
            self.parser = StreamParser(self.mode)

    def message(self) -> Assistant:
        """The answer as an assistant turn for the conversation history."""
        return self.parser.message()

    @property
    def answer(self) -> str:
        return self.message().content

    @property
    def reasoning(self) -> str | None:
        return self.message().reasoning

    @property
    def has_answer(self) -> bool:
        """True once any answer text or tool call arrived (reasoning alone does not count)."""
        return bool(self.answer) or bool(self.tool_calls)

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.reused_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes out of prefill; decode time runs from it to the end
        n = self.completion_tokens - 1
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0

    def to_json(self, model: str) -> dict:
        """The `v4 ask --json` record."""
        return {
            "answer": self.answer,
            "reasoning": self.reasoning,
            "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in self.tool_calls],
            "usage": {"prompt_tokens": self.prompt_tokens, "reused_tokens": self.reused_tokens,
                      "completion_tokens": self.completion_tokens},
            "timings": {"prefill_s": round(self.prefill_s, 4), "ttft_s": round(self.ttft_s, 4),
                        "decode_s": round(self.decode_s, 4), "prefill_tps": round(self.prefill_tps, 2),
                        "decode_tps": round(self.decode_tps, 2)},
            "finish_reason": self.finish_reason,
            "model": model,
            "mode": self.mode.value,
        }


def run_turn(session, prompt: Sequence[int], sampling, reply: Reply, marks: Sequence[int] = (),
             on_event: Callable[[Event], None] | None = None,
             progress: Callable[[int, int], None] | None = None,
             latch: InterruptLatch | None = None) -> Reply:
    """Generate one answer to `prompt` through `session`, filling `reply` as records arrive and passing each parser
    event to `on_event`. A latch request stops at the next token (the generator is closed at a yield, so the
    session keeps its cache); a KeyboardInterrupt propagates with `reply` holding what arrived so far."""
    from v4cli.engine.records import DoneRecord, TokenRecord

    def emit(events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, ToolCallEvent):
                reply.tool_calls.append(ev)
            elif isinstance(ev, ParseError):
                reply.errors.append(ev)
            if on_event is not None:
                on_event(ev)

    reply.prompt_tokens = len(prompt)
    t0 = time.perf_counter()
    t_first = None
    gen = session.generate(prompt, sampling, marks=marks, progress=progress)
    try:
        for rec in gen:
            if t_first is None:
                t_first = time.perf_counter()
                reply.reused_tokens = session.reused
                reply.prefill_s = reply.ttft_s = t_first - t0
                if latch is not None:
                    latch.decoding = True
            if isinstance(rec, TokenRecord):
                reply.completion_tokens += 1
                emit(reply.parser.feed(rec.text))
            elif isinstance(rec, DoneRecord):
                reply.finish_reason = rec.finish_reason
                reply.reused_tokens = session.reused  # a remote session learns it only from the final usage
                if rec.finish_reason == "eos":
                    reply.completion_tokens += 1  # EOS was sampled, though never yielded as a token
                emit(reply.parser.feed(rec.text))
            if latch is not None and latch.requested:
                reply.interrupted = True
                break
    except KeyboardInterrupt:
        reply.interrupted = True
        raise
    finally:
        gen.close()
        if latch is not None:
            latch.decoding = False
        if t_first is not None:
            reply.decode_s = time.perf_counter() - t_first
        if reply.interrupted:
            reply.finish_reason = "interrupted"
        if not reply.parser.done:
            emit(reply.parser.finish())
    return reply


# ---------------------------------------------------------------------------------------------- ask prompts

_SLOT = "\x00"  # stands in for the user message when splitting the rendered prompt around it


def wrap_ids(encoder, mode: Mode, system: str | None = None) -> tuple[list[int], list[int]]:
    """(head, tail) ids around a user message: what `render` puts before it (BOS, the Think-Max prefix, the
    system prompt, `<｜User｜>`) and after it (`<｜Assistant｜>` and the think tag)."""
    from v4cli.prompt.encoding import System

    msgs = ([System(system)] if system else []) + [User(_SLOT)]
    head, tail = render(msgs, mode).split(_SLOT)
    return encoder.encode(head), encoder.encode(tail)


def ask_marks(offset: int, pieces: Sequence[Any], gap: int = ASK_MARK_GAP, spread: int = 4,
              most: int = 4) -> list[int]:
    """Snapshot positions for an ask prompt whose context pieces start at `offset`: where the context ends (so
    another question over the same files restarts there), and up to `most` file boundaries at least gap,
    gap·spread, gap·spread², … tokens before that end. Recently modified files come last, so edits land near the
    end: dense save points there keep the re-prefill after an edit short, while a 1M-token context writes only a
    handful of full states to disk instead of one every few thousand tokens."""
    pos, bounds = offset, []
    for p in pieces:
        if p.kind == "question":
            break
        pos += p.n_tokens
        if p.kind == "file":
            bounds.append(pos)
    end = pos
    marks, want = [], gap
    for b in reversed(bounds):
        if len(marks) == most:
            break
        if end - b >= want:
            marks.append(b)
            want = (end - b) * spread
    if end > offset:
        marks.append(end)
    return sorted(marks)


def open_session(eng, chunk: int, cache_size: str):
    """A Session over `eng`, with the disk prefix cache when the engine's state can be saved and the size is not 0.

    The llama.cpp engine keeps its own state (no torch cache to snapshot), so it runs without one."""
    from v4cli.engine import Engine
    from v4cli.engine.prefix_cache import PrefixCache, parse_cache_size
    from v4cli.engine.session import Session

    limit = parse_cache_size(cache_size)
    store = PrefixCache.for_engine(eng, max_bytes=limit) if limit and isinstance(eng, Engine) else None
    return Session(eng, chunk=chunk, store=store, save_every=SAVE_EVERY if store else None)


# ---------------------------------------------------------------------------------------------- chat


class Chat:
    """A chat session: conversation + Session + sampling; `turn` answers one message with prefix reuse."""

    def __init__(self, session, encoder, conversation, sampling, ctx: int, model: str):
        self.session, self.encoder, self.conversation = session, encoder, conversation
        self.sampling, self.ctx, self.model = sampling, ctx, model
        self.last: Reply | None = None

    def turn(self, text: str, on_event: Callable[[Event], None] | None = None,
             progress: Callable[[int, int], None] | None = None, latch: InterruptLatch | None = None) -> Reply:
        """Answer `text`. Ctrl-C (a latch request or KeyboardInterrupt) ends the turn early: a partial answer
        stays in the history; a turn with no answer text yet is dropped with its user message."""
        from dataclasses import replace

        conv = self.conversation
        conv.add_user(text)
        reply = Reply(conv.mode)
        try:
            ids, stable = conv.prompt_ids(self.encoder)
            room = self.ctx - len(ids)
            if room <= 0:
                raise BadInput(f"the conversation is {len(ids):,} tokens, the context is {self.ctx:,}",
                               hint="/reset, or restart with a larger --ctx")
            sampling = replace(self.sampling, max_tokens=min(self.sampling.max_tokens, room))
            # Session snapshots only strictly inside the prompt; in non-think mode the stable prefix is the whole
            # prompt, so mark one token short of it: a re-tokenized answer then still restarts there
            marks = [min(stable, len(ids) - 1)]
            run_turn(self.session, ids, sampling, reply, marks, on_event, progress, latch)
        except KeyboardInterrupt:
            reply.interrupted, reply.finish_reason = True, "interrupted"
        except BaseException:
            conv.drop_unanswered()
            raise
        finally:
            self.last = reply
        if reply.has_answer or not reply.interrupted:
            conv.add_answer(reply.message())
        else:
            conv.drop_unanswered()
        return reply

    @property
    def held(self) -> int:
        """Tokens the session's live cache holds."""
        return len(self.session.tokens)

    def token_report(self) -> list[str]:
        """The /tokens lines."""
        conv = self.conversation
        history = len(self.encoder.encode(conv.history_text())) if conv.turns or conv.system else 0
        system = len(self.encoder.encode(conv.system)) if conv.system else 0
        lines = [
            f"conversation  {history:,} tokens ({len(conv.turns)} messages, system prompt {system:,})",
            f"context       {self.held:,} of {self.ctx:,} tokens held ({100 * self.held / self.ctx:.1f}%)",
        ]
        r = self.last
        if r is not None:
            lines.append(f"last turn     prompt {r.prompt_tokens:,} ({r.reused_tokens:,} reused, "
                         f"{r.prompt_tokens - r.reused_tokens:,} prefilled), completion {r.completion_tokens:,}, "
                         f"finish {r.finish_reason}")
        return lines
