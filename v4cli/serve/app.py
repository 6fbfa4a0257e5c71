"""The HTTP application of `v4 serve`: one FastAPI app, the API routers, auth, limits and errors.

Every API module exposes `router(server) -> APIRouter`. Errors are raised as `APIError` (or any `V4Error`, mapped
here) and rendered in the shape of the API the path belongs to, so an Anthropic client never sees an OpenAI error
body and no client ever sees a traceback. Auth and the body-size limit run as one ASGI middleware in front of
everything, so they hold before any body is read.
"""

from __future__ import annotations

import hmac
import importlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from quant.errors import BadInput, NotFoundError, V4Error
from v4cli.serve.runner import Busy, Runner

log = logging.getLogger("v4.serve")

DEFAULT_MAX_BODY = 32 * 1024 * 1024
# the API routers create_app includes, in order; a module not in this build yet is skipped
API_MODULES = ("v4cli.serve.openai_chat", "v4cli.serve.anthropic", "v4cli.serve.responses")
OPEN_PATHS = ("/health",)  # answered without a key: it names the model and the queue, nothing else


@dataclass
class Server:
    """What the routers share: the runner and the limits the server was started with."""

    runner: Runner
    api_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY
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


# ---------------------------------------------------------------------------------------------- auth and limits


class _TooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: the API key (Bearer or x-api-key) and the body-size limit, checked before the app runs."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.server.api_key
        if key and path not in OPEN_PATHS and not _authorized(headers, key):
            return await error_response(path, APIError(
                401, "missing or wrong API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                "authentication_error", code="invalid_api_key"))(scope, receive, send)
        limit = self.server.max_body
        too_large = APIError(413, f"the request body is over the server's limit of {limit:,} bytes "
                                  "(v4 serve --max-body)", "request_too_large")
        try:
            declared = int(headers.get("content-length", "0"))
        except ValueError:
            declared = 0
        if declared > limit:
            return await error_response(path, too_large)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a chunked body that never declared its length
                    raise too_large
            return message

        await self.app(scope, counted, send)


def _authorized(headers: dict[str, str], key: str) -> bool:
    auth = headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), key.encode())


# ---------------------------------------------------------------------------------------------- the app


def create_app(server: Server) -> FastAPI:
    """The app: /health, /v1/models and every API router, behind the guard, errors in each API's shape."""
    runner = server.runner
    app = FastAPI(title="v4 serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(request.url.path, e)

    @app.exception_handler(V4Error)
    async def _v4_error(request: Request, e: V4Error):
        return error_response(request.url.path, api_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.url.path} does not take {request.method}"}.get(e.status_code, str(e.detail))
        return error_response(request.url.path, APIError(e.status_code, message, kind))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return error_response(request.url.path, APIError(400, f"invalid request: {e.errors()}"))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return error_response(request.url.path, api_error(e))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": runner.model_name, "context": runner.ctx,
                "scheduling": "one request at a time, queued in arrival order", **runner.status()}

    @app.get("/v1/models")
    async def models():
        card = {"id": runner.model_name, "object": "model", "created": int(server.started), "owned_by": "v4",
                "context_length": runner.ctx}
        # Codex reads a `models` array; ollama-style clients read name/model
        return {"object": "list", "data": [card],
                "models": [{**card, "slug": runner.model_name, "name": runner.model_name, "model": runner.model_name,
                            "display_name": runner.model_name, "context_window": runner.ctx}]}

    for name in API_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        app.include_router(module.router(server))

    app.add_middleware(Guard, server=server)
    return app
