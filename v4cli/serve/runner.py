"""The one engine behind `v4 serve`: requests become prompt ids, run one at a time, and stream back as events.

The engine is not reentrant and holds one live cache, so generations are serialized: an asyncio lock (FIFO) admits
one request at a time, and a single worker thread runs the blocking torch/llama.cpp loop. The lock is released by
the worker's completion, not by the HTTP side, so a client that vanishes mid-answer can never let a second
generation start while the first is still using the engine. Cancellation is a flag the worker checks at every
token (and between prefill chunks), set when the client disconnects or the server shuts down.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from quant.errors import BadInput, NotFoundError, V4Error
from v4cli.engine.options import RUN
from v4cli.prompt.encoding import EOS_ID, Assistant
from v4cli.prompt.parser import End, StreamParser
from v4cli.serve.core import ChatRequest, Event, Result, TokenLogprobs, Usage
from v4cli.serve.history import History

DEFAULT_MAX_TOKENS = 32_768  # the per-request cap unless `v4 serve --max-tokens` says otherwise
POLL_S = 0.5  # how often a silent request (queued, or in a long prefill) looks for its client having gone


class Busy(V4Error):
    """The server cannot take the request now (the queue is full, or it is shutting down): refused at once, 503."""


class _Cancelled(Exception):
    """Raised inside the worker (from the prefill progress callback) to stop a prefill between chunks."""


@dataclass(frozen=True)
class Job:
    """A checked request: its prompt ids, the snapshot mark, and sampling with max_tokens fitted to the context."""

    req: ChatRequest
    ids: list[int]
    mark: int
    sampling: Any
    constraint: Any = None  # the compiled TokenConstraint, when the request has a Constraint


class Runner:
    """One loaded engine + Session; `events` runs a request when its turn comes and streams its events."""

    def __init__(self, engine, session, ctx: int, model_name: str, *, aliases: tuple[str, ...] = (),
                 max_tokens: int = DEFAULT_MAX_TOKENS, max_queue: int = 64):
        from v4cli.chat.conversation import PromptEncoder

        self.engine, self.session, self.ctx, self.model_name = engine, session, ctx, model_name
        self.names = {model_name, Path(model_name).stem, *aliases}
        self.max_tokens, self.max_queue = max_tokens, max_queue
        self.tokenizer = engine.tokenizer
        self.encoder = PromptEncoder(engine.tokenizer)
        self.history = History.for_session(session)  # kept beside the disk prefix cache: reuse survives a restart
        self.waiting = 0  # requests queued behind the running one
        self.busy = False
        self.served = 0
        self.cancelled = 0
        self._lock: asyncio.Lock | None = None  # made in the serving loop (a lock binds to its loop)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="v4-engine")
        self._stopping = threading.Event()
        self._encoding = threading.Lock()
        # snapshots only where the engine's cache can take a state back (both engines today; a backend without
        # it still reuses its live cache when a request extends the last one)
        self._snapshots = hasattr(session.cache, "load_bytes")

    @classmethod
    def load(cls, model: str | None, *, engine: str = RUN.engine, kv_format: str = RUN.kv_format,
             device: str = RUN.device, threads: int | None = None, chunk: int | None = None,
             ctx: int | str | None = None, cache_size: str = "0", **kwargs) -> Runner:
        """Load the model the way `v4 chat` does: same resolver, fit check, engine and disk prefix cache."""
        from v4cli.chat.answer import load_engine, open_session, plan_context
        from v4cli.store import find_gguf_model

        path = find_gguf_model(model)
        n_ctx = plan_context(path, ctx, kv_format)
        eng = load_engine(path, engine, kv_format, device, threads, n_ctx)
        session = open_session(eng, chunk or RUN.chunk, cache_size)
        return cls(eng, session, n_ctx, path.name, **kwargs)

    # -- prompts ---------------------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        """NotFoundError unless `name` is empty or one of the names this server answers to."""
        if name and name not in self.names:
            raise NotFoundError(f"model {name!r} is not served here; this server runs {self.model_name!r}")

    def prompt_ids(self, req: ChatRequest) -> list[int]:
        """The token ids the model is fed for `req` (BadInput when the messages cannot form a prompt): earlier
        turns this server generated come back as the exact ids it sampled (history.py), so the cache hits."""
        with self._encoding:  # the encoder's piece cache is not thread-safe; prepare may run in a threadpool
            return self.history.encode(req.messages, req.mode, req.tools or None, self.encoder, self.tokenizer)

    def count_tokens(self, req: ChatRequest) -> int:
        return len(self.prompt_ids(req))

    def prepare(self, req: ChatRequest) -> Job:
        """Check `req` against the model and the context: NotFoundError for another model's name, BadInput for a
        prompt that does not fit (naming the numbers). max_tokens is capped by the server and by the room left."""
        self.check_model(req.model)
        ids = self.prompt_ids(req)
        room = self.ctx - len(ids)
        if room <= 0:
            raise BadInput(f"the prompt is {len(ids):,} tokens and the context is {self.ctx:,}: "
                           f"{len(ids) - self.ctx + 1:,} over, with no room for an answer",
                           hint="shorten the conversation or restart v4 serve with a larger --ctx")
        sampling = replace(req.sampling, max_tokens=max(1, min(req.sampling.max_tokens, self.max_tokens, room)))
        # compiled here, so a constraint the grammar engine refuses is a 400 before any byte of a stream is sent
        constraint = self._compile(req) if req.constraint is not None else None
        # Snapshot one token short of the end: every later request of this conversation starts with that much
        # (in thinking mode without tools the next one renders `</think>` where this one ends in `<think>`)
        return Job(req, ids, len(ids) - 1, sampling, constraint)

    # -- running ---------------------------------------------------------------------------------------------

    def status(self) -> dict:
        """What /health reports."""
        return {"busy": self.busy, "queued": self.waiting, "served": self.served, "cancelled": self.cancelled}

    async def events(self, req: ChatRequest | Job, is_disconnected: Callable[[], Awaitable[bool]] | None = None
                     ) -> AsyncIterator[Event]:
        """Run `req` when the engine is free and yield its events, ending with one `Result`. Call `prepare` first
        to surface a bad request before any response is sent (a ChatRequest is prepared here). A disconnected
        client (checked at every event) or a closed iterator cancels the generation at the next token."""
        job = req if isinstance(req, Job) else self.prepare(req)
        if self._lock is None:
            self._lock = asyncio.Lock()
        self.admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        self.waiting += 1
        try:
            turn = await self._wait_turn(is_disconnected)
        finally:
            self.waiting -= 1
        if not turn:  # the client left while queued: nothing ran
            self.cancelled += 1
            yield Result("cancelled", Usage(len(job.ids), 0, 0), Assistant(), "")
            return
        released = False

        def finished(*_) -> None:  # runs in the loop; once, whichever of its two callers comes first
            nonlocal released
            if not released:
                released, self.busy = True, False
                self._lock.release()

        def last(item) -> None:
            queue.put_nowait(item)
            finished()

        try:
            self._check_open()  # shut down while this one waited
            self.busy = True
            # The last event and the engine's release arrive in one loop callback, so a client that sends its
            # next request as soon as it reads the answer finds the engine free (the worker thread may not run
            # again for a while). The pool's one thread still starts the next job only once this one has
            # returned; the future's completion frees the lock too, should the job never run (pool shut down).
            fut = loop.run_in_executor(self._pool, self._work, job, cancel,
                                       lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
                                       lambda item: loop.call_soon_threadsafe(last, item))
        except BaseException:
            finished()
            raise

        def never_ran(f) -> None:
            if f.cancelled():  # the pool shut down before it started: nothing else will answer this request
                queue.put_nowait(Busy("the server is shutting down", hint="retry once it is back"))
            finished()

        fut.add_done_callback(never_ran)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), POLL_S)
                except asyncio.TimeoutError:  # a long prefill sends nothing: look for a client gone meanwhile
                    if is_disconnected is not None and await is_disconnected():
                        cancel.set()
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Result):
                    return
                if is_disconnected is not None and await is_disconnected():
                    cancel.set()
        finally:
            cancel.set()  # a no-op after the Result; otherwise the client went away or the stream failed

    def admit(self) -> None:
        """Busy (503) when the request could not even queue: the server is shutting down, or the engine is busy and
        --max-queue requests already wait. `events` checks this itself; a streaming API calls it before sending its
        200, so the client gets a 503 it knows to retry rather than an error inside a stream."""
        self._check_open()
        if self._lock is not None and self._lock.locked() and self.waiting >= self.max_queue:
            raise Busy(f"the engine is busy and {self.waiting} more request(s) wait for it "
                       f"(v4 serve --max-queue {self.max_queue})", hint="retry later; it runs one request at a time")

    async def _wait_turn(self, is_disconnected: Callable[[], Awaitable[bool]] | None) -> bool:
        """Take the engine lock (FIFO); False, without it, if the client disconnects while waiting."""
        acquire = asyncio.ensure_future(self._lock.acquire())
        ok = False
        try:
            while not ok:
                done, _ = await asyncio.wait({acquire}, timeout=POLL_S)
                ok = bool(done)
                if not ok and is_disconnected is not None and await is_disconnected():
                    break
        finally:
            if not ok:
                if acquire.done() and not acquire.cancelled():
                    self._lock.release()  # granted just as we gave up (or were cancelled): pass it on
                else:
                    acquire.cancel()  # asyncio.Lock hands a cancelled waiter's turn to the next one
        return ok

    def close(self) -> None:
        """Shutting down: the running generation stops at its next token, queued and new requests are refused."""
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def closing(self) -> bool:
        return self._stopping.is_set()

    def _check_open(self) -> None:
        if self._stopping.is_set():
            raise Busy("the server is shutting down", hint="retry once it is back")

    def _work(self, job: Job, cancel: threading.Event, put: Callable[[Any], None], last: Callable[[Any], None]
              ) -> None:
        """The worker thread: one generation through the Session, each record turned into events for `put`, and
        the Result (or the exception) to `last` once nothing more will touch the engine."""
        try:
            item: Any = self._generate(job, cancel, put)
        except BaseException as e:  # handed to the request's coroutine, which raises it there
            item = e
        last(item)

    def _generate(self, job: Job, cancel: threading.Event, put: Callable[[Any], None]) -> Result:
        from v4cli.engine.records import DoneRecord, TokenRecord

        req = job.req
        parser = StreamParser(req.mode)
        stop = lambda: cancel.is_set() or self._stopping.is_set()  # noqa: E731

        def progress(done: int, total: int) -> None:
            if stop():
                raise _Cancelled

        def emit(events) -> None:
            for ev in events:
                if not isinstance(ev, End):
                    put(ev)

        kwargs: dict[str, Any] = {}
        if job.constraint is not None:
            kwargs["constraint"] = job.constraint
        if req.logprobs is not None:
            kwargs["logprobs"] = req.logprobs
        t0 = time.perf_counter()
        ttft, t_first, reused, n, finish = 0.0, None, 0, 0, "length"
        stop_string: str | None = None
        raw: list[str] = []
        sampled: list[int] = []
        marks = [job.mark] if self._snapshots else []
        gen = self.session.generate(job.ids, job.sampling, marks=marks, progress=progress, **kwargs)
        try:
            for rec in gen:
                if t_first is None:
                    t_first = time.perf_counter()
                    ttft, reused = t_first - t0, self.session.reused
                if isinstance(rec, TokenRecord):
                    n += 1
                    sampled.append(rec.token)
                    raw.append(rec.text)
                    if rec.logprob is not None:  # present when req.logprobs asked for it
                        put(self._logprobs(rec))
                    emit(parser.feed(rec.text))
                elif isinstance(rec, DoneRecord):
                    finish, stop_string = rec.finish_reason, rec.stop
                    if finish == "eos":
                        n += 1  # EOS was sampled, though never yielded as a token
                        sampled.append(EOS_ID)
                    raw.append(rec.text)
                    emit(parser.feed(rec.text))
                if stop() and not isinstance(rec, DoneRecord):
                    finish = "cancelled"
                    break
        except _Cancelled:
            finish = "cancelled"
        finally:
            gen.close()
        emit(parser.finish())
        message: Assistant = parser.message()
        if finish == "cancelled":
            self.cancelled += 1
        else:
            self.served += 1
        reason = {"eos": "stop", "stop": "stop", "length": "length"}.get(finish, finish)
        if reason == "stop" and message.tool_calls:
            reason = "tool_calls"
        decode_s = time.perf_counter() - t_first if t_first is not None else 0.0
        result = Result(reason, Usage(len(job.ids), reused, n), message, "".join(raw), ttft_s=ttft,
                        decode_tps=(n - 1) / decode_s if decode_s > 0 and n > 1 else 0.0,
                        stop_sequence=stop_string if finish == "stop" else None)
        if reason != "cancelled":
            self.history.remember(req, result, sampled)
        return result

    def _compile(self, req: ChatRequest):
        """The token-level constraint for `req` (constrained decoding, v4cli.engine.grammar)."""
        from v4cli.engine.grammar import compile_constraint

        return compile_constraint(req.constraint, req.tools, self.tokenizer, req.mode)

    def _logprobs(self, rec) -> TokenLogprobs:
        text = lambda i: self.tokenizer.decode([i], skip_special_tokens=False)  # noqa: E731
        return TokenLogprobs(text(rec.token), float(rec.logprob),
                             tuple((text(i), float(lp)) for i, lp in rec.top))

