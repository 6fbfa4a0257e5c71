"""The HTTP application of `v4 serve`: one FastAPI app, the API routers, auth, limits and errors.

Every API module exposes `router(server) -> APIRouter`. Errors are raised as `APIError` (or any `V4Error`, mapped
here) and rendered in the shape of the API the path belongs to, so an Anthropic client never sees an OpenAI error
body and no client ever sees a traceback. Auth and the body-size limit run as one ASGI middleware in front of
everything, so they hold before any body is read.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from quant.errors import V4Error
from v4cli.serve import anthropic, openai_chat, responses
from v4cli.serve.http import APIError, Server, api_error, error_response, log

API_MODULES = (openai_chat, anthropic, responses)  # the API routers create_app includes, in order
OPEN_PATHS = ("/health",)  # answered without a key: it names the model and the queue, nothing else


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

    for module in API_MODULES:
        app.include_router(module.router(server))

    app.add_middleware(Guard, server=server)
    return app
