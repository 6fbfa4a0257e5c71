"""A Session: one conversation's live engine state, reused across prompts so no token is prefilled twice.

The session knows exactly which tokens its cache holds. A new prompt that starts with them prefills only the
rest; one that diverges (a chat turn whose earlier reasoning was dropped from the history) restores the longest
snapshot taken at a *mark* — a token position the caller knows later prompts will share, such as the end of
`stable_prefix` — and prefills from there. A `PrefixStore` (the disk prefix cache) extends the same lookup
across processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

from v4cli.engine.generate import Engine
from v4cli.engine.options import RUN
from v4cli.engine.records import DoneRecord, TokenRecord
from v4cli.engine.sampling import SamplingParams
from quant.errors import BadInput
from v4cli.model.cache import ModelCache

if TYPE_CHECKING:
    from v4cli.engine.grammar import TokenConstraint

Progress = Callable[[int, int], None]  # (tokens prefilled so far, tokens to prefill)


class PrefixStore(Protocol):
    """Where snapshots outlive the process (the disk prefix cache implements this)."""

    def lookup(self, tokens: Sequence[int], longer_than: int = 0,
               restore: Callable[[bytes, int], ModelCache] | None = None) -> tuple[int, object] | None:
        """The longest saved prefix of `tokens` longer than `longer_than`: (its length, `restore(its bytes, its
        length)`), or None. An entry `restore` refuses with BadState is dropped and the next longest tried.
        (`longer_than` spares reading a state that the live cache already beats.)"""

    def save(self, tokens: Sequence[int], state: bytes) -> None:
        """Keep the cache state reached after exactly `tokens`."""

    def discard(self, tokens: Sequence[int]) -> None:
        """Forget the state saved for exactly `tokens` (an automatic checkpoint a later save superseded)."""


@dataclass
class Snapshot:
    tokens: tuple[int, ...]
    state: bytes


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Session:
    """Live cache + the exact tokens in it; `generate` reuses whatever prefix it can."""

    def __init__(self, engine: Engine, store: PrefixStore | None = None, max_snapshots: int = 4,
                 chunk: int = RUN.chunk, save_every: int | None = None):
        if save_every is not None and save_every < 1:
            raise BadInput(f"save_every must be a positive token count, not {save_every}")
        self.engine, self.store, self.chunk = engine, store, chunk
        # with a store: also checkpoint a long prefill at every multiple of save_every tokens, so an
        # interrupted one resumes there; each checkpoint is dropped once the next save of the prefill lands
        self.save_every = save_every
        self.max_snapshots = max_snapshots
        self.snapshots: list[Snapshot] = []
        self.reused = 0  # tokens of the last prompt that were not prefilled
        self.reset()

    def reset(self) -> None:
        """Forget the live state (snapshots stay: they are still valid for this model)."""
        self.cache = self.engine.new_cache()
        self.tokens: list[int] = []

    # --- reuse -----------------------------------------------------------------------------------------------

    def _restore(self, prompt: Sequence[int]) -> None:
        """Make the live cache hold the longest available prefix of prompt[:-1] (the last token is always fed:
        its logits are needed)."""
        want = list(prompt[:-1])
        best = common_prefix(self.tokens, want) if len(self.tokens) <= len(want) else -1
        if best != len(self.tokens):
            best = -1  # the live cache diverges: it can only be used whole
        source: bytes | None = None
        for snap in self.snapshots:
            n = len(snap.tokens)
            if n > max(best, 0) and n <= len(want) and common_prefix(snap.tokens, want) == n:
                best, source = n, snap.state
        # a disk entry is restored into a fresh cache and checked there, so a bad one costs only its own prefill
        hit = self.store.lookup(want, max(best, 0), self._restored) if self.store is not None else None
        if hit is not None and hit[0] > max(best, 0):
            best, self.cache = hit
            self.tokens = list(want[:best])
        elif source is not None:
            self.cache = self._restored(source, best)
            self.tokens = list(want[:best])
        elif best < 0:
            self.reset()

    def _restored(self, state: bytes, n_tokens: int) -> ModelCache:
        """A new cache holding `state`, the state after `n_tokens` tokens (BadState if it is not one)."""
        cache = self.engine.new_cache()
        cache.load_bytes(state, n_tokens)
        return cache

    def snapshot(self) -> None:
        """Remember the current state (in memory, and in the store if any)."""
        state = self.cache.to_bytes()
        self.snapshots = [s for s in self.snapshots if s.tokens != tuple(self.tokens)]
        self.snapshots.append(Snapshot(tuple(self.tokens), state))
        del self.snapshots[: -self.max_snapshots]
        if self.store is not None:
            self.store.save(self.tokens, state)

    def _feed(self, ids: Sequence[int], progress: Progress | None, done: int, total: int) -> None:
        for i in range(0, len(ids), self.chunk):
            part = ids[i: i + self.chunk]
            self.engine.prefill(part, self.cache, self.chunk)
            self.tokens.extend(part)
            if progress:
                progress(done + i + len(part), total)

    # --- the one entry point ----------------------------------------------------------------------------------

    def generate(self, prompt: Sequence[int], sampling: SamplingParams = SamplingParams(),
                 marks: Sequence[int] = (), progress: Progress | None = None,
                 constraint: "TokenConstraint | None" = None, logprobs: int | None = None
                 ) -> Iterator[TokenRecord | DoneRecord]:
        """Reuse the longest held prefix of `prompt`, prefill the rest (snapshotting at each mark: a token count
        later prompts will share; with `save_every`, also checkpointing to the store), then sample. Same records,
        `constraint` and `logprobs` as `Engine.generate`."""
        prompt = list(prompt)
        if not prompt:
            raise BadInput("nothing to prefill: the prompt is empty")
        self._restore(prompt)
        start = len(self.tokens)
        self.reused = start
        todo = len(prompt) - start
        marked = {m for m in marks if start < m < len(prompt)}
        auto: set[int] = set()
        if self.save_every and self.store is not None:
            auto = set(range((start // self.save_every + 1) * self.save_every, len(prompt), self.save_every))
        superseded: list[int] | None = None  # the last automatic checkpoint, until a later save replaces it
        try:
            for m in sorted(marked | auto):
                self._feed(prompt[len(self.tokens): m], progress, len(self.tokens) - start, todo)
                if m in marked:
                    self.snapshot()
                else:
                    self.store.save(self.tokens, self.cache.to_bytes())
                if superseded is not None:
                    self.store.discard(superseded)
                superseded = list(self.tokens) if m not in marked else None
            rest = prompt[len(self.tokens):]
            if progress and len(rest) > 1:
                self._feed(rest[:-1], progress, len(self.tokens) - start, todo)
                rest = rest[-1:]
        except BaseException:
            self.reset()  # interrupted mid-forward: the cache may be half-updated
            raise
        yield from self._sample(rest, sampling, progress, todo, constraint, logprobs)

    def _sample(self, rest: list[int], sampling: SamplingParams, progress: Progress | None, todo: int,
                constraint: "TokenConstraint | None", logprobs: int | None) -> Iterator[TokenRecord | DoneRecord]:
        gen = self.engine.generate(rest, sampling, cache=self.cache, chunk=self.chunk, constraint=constraint,
                                   logprobs=logprobs)
        emitted: list[int] = []
        at_yield = False
        try:
            self.tokens.extend(rest)
            for rec in gen:
                if isinstance(rec, TokenRecord):
                    if not emitted and progress:
                        progress(todo, todo)
                    emitted.append(rec.token)
                else:
                    # eos: every emitted token was fed back; stop/length: the last one was not
                    fed = emitted if rec.finish_reason == "eos" else emitted[:-1]
                    self.tokens.extend(fed)
                    emitted = []
                at_yield = True
                yield rec
                at_yield = False
        except GeneratorExit:
            # the consumer stopped reading (Ctrl-C in the UI): the cache is consistent, the last token unfed
            if at_yield:
                self.tokens.extend(emitted[:-1])
                gen.close()
            else:
                self.reset()
            raise
        except BaseException:
            self.reset()
            raise
