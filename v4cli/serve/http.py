"""What the routers of `v4 serve` share: the `Server` they serve from, `APIError` and the error body of each API,
and reading a JSON body. Its own module, below the app and the three API routers, so that each router imports it
and the app imports the routers, with no circle."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from quant.errors import BadInput, NotFoundError, V4Error
from v4cli.serve.runner import Busy, Runner

log = logging.getLogger("v4.serve")


@dataclass
class Server:
    """What the routers share: the runner and the limits the server was started with."""

    runner: Runner
    api_key: str | None
    max_body: int  # bytes; its default is `v4 serve --max-body`'s
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = self.started or time.time()


class APIError(Exception):
    """A request that gets an error answer. `kind` is the Anthropic error type (the finer vocabulary); the OpenAI
    shape maps it to its own `type`, with `param` and `code` when known."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


# ---------------------------------------------------------------------------------------------- error shapes

_OPENAI_TYPES = {"not_found_error": "invalid_request_error", "request_too_large": "invalid_request_error",
                 "overloaded_error": "server_error", "api_error": "server_error"}


def openai_error(e: APIError) -> dict:
    """`{"error": {message, type, param, code}}`: Chat Completions and Responses."""
    return {"error": {"message": e.message, "type": _OPENAI_TYPES.get(e.kind, e.kind), "param": e.param,
                      "code": e.code}}


def anthropic_error(e: APIError) -> dict:
    """`{"type": "error", "error": {type, message}}`: Messages."""
    return {"type": "error", "error": {"type": e.kind, "message": e.message}}


def error_shape(path: str) -> Callable[[APIError], dict]:
    """The error body of the API that `path` belongs to."""
    return anthropic_error if path.startswith("/v1/messages") else openai_error


def error_response(path: str, e: APIError) -> JSONResponse:
    headers = {"retry-after": "1"} if e.status in (429, 503) else None
    return JSONResponse(error_shape(path)(e), status_code=e.status, headers=headers)


def api_error(e: Exception) -> APIError:
    """A library error as the answer it deserves: the user's input → 4xx with its message, else 500."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, V4Error):
        msg = str(e) + (f" ({e.hint})" if e.hint else "")
        if isinstance(e, NotFoundError):
            return APIError(404, msg, "not_found_error", param="model", code="model_not_found")
        if isinstance(e, BadInput):
            return APIError(400, msg)
        if isinstance(e, Busy):
            return APIError(503, msg, "overloaded_error")
        return APIError(500, msg, "api_error")
    return APIError(500, "internal error (the server log has the traceback)", "api_error")


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    body = await request.body()
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:  # JSON may spell a lone surrogate (\ud800), which no tokenizer can take: refuse it here, once for all APIs
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"the request holds text that is not valid Unicode (a lone surrogate: "
                            f"{e.object[max(0, e.start - 20):e.start]!r}…)") from None
    return data
