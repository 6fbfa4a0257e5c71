"""Typed records streamed by `Engine.generate`: the CLI, chat UI and benchmarks all consume the same stream."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenRecord:
    """One generated token and the text it completes (may be "" while a UTF-8 character or stop string is open)."""

    token: int
    text: str
    channel: str | None = None  # set by the chat layer's parser (reasoning / content / tool call)
    # with `logprobs` asked for: the token's log-probability under the raw model distribution (log-softmax of the
    # logits, before temperature, filters and any grammar mask: OpenAI's convention), and the N most likely
    # (token id, logprob) under that same distribution, most likely first
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Timings:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # from the call to the first generated token
    decode_tokens: int = 0  # forward passes after the first sampled token
    decode_s: float = 0.0  # wall time from the first sampled token to the end

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Memory:
    peak_rss_bytes: int
    kv_bytes: int  # state held by the cache (windows + compressed entries + compressor buffers)


@dataclass
class DoneRecord:
    """The last record: why generation stopped ("eos", "stop", "length"), text held back and flushed, stats, and
    for "stop" the stop string that matched (Anthropic's API reports it)."""

    finish_reason: str
    text: str
    timings: Timings
    memory: Memory
    stop: str | None = None
