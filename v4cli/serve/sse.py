"""Server-sent events for the streaming APIs: FastAPI's SSE encoder frames them, and a keep-alive fills silences.

A request queued behind another one, or a long prefill, sends nothing for minutes; clients and proxies drop a
silent connection (httpx read timeouts, Claude Code's idle watchdog), so the streams send a ping meanwhile.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event
from starlette.responses import StreamingResponse

T = TypeVar("T")

PING_INTERVAL = 10.0  # seconds of silence before a keep-alive
COMMENT_PING = KEEPALIVE_COMMENT  # ": ping": every SSE parser skips comment lines


def frame(event: str | None, data: Any) -> bytes:
    """One SSE event: `event:` name (None: none) and `data:` the JSON of `data`."""
    return format_sse_event(event=event, data_str=json.dumps(data, ensure_ascii=False))


def event_stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    """The streaming answer; no proxy buffering, so each event leaves as it is made."""
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


async def with_pings(items: AsyncIterator[T], interval: float = PING_INTERVAL) -> AsyncIterator[T | None]:
    """`items`, with None whenever `interval` seconds pass without one.

    The next item is awaited in a task, so a timeout never cancels (and thereby ends) the underlying stream; when
    this iterator is closed or cancelled, that task is cancelled, which closes the stream and so cancels the
    generation behind it."""
    it = aiter(items)
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(it))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()  # the stream is mid-step: cancelling the step ends it
        elif hasattr(it, "aclose"):
            await it.aclose()
