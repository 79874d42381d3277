"""Errors in OpenAI's format, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status and headers
(Retry-After) each kind needs. Every failure a client can see goes through `ApiError`, so the SDKs map them to
their typed exceptions (NotFoundError, BadRequestError, RateLimitError...)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmhost.errors import RequestError
from llmhost.host.client import HostRequestError, HostUnavailableError

log = logging.getLogger("llmhost.server")

RETRY_LOADING_S = 5  # a model being loaded: long enough for a small model, short enough not to idle
RETRY_QUEUE_FULL_S = 1  # a full queue drains at decode speed


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def sse_event(self) -> str:
        """The error as a stream event; the OpenAI SDK raises APIError when it reads one."""
        return f"data: {json.dumps(self.body())}\n\n"


def model_not_found(name: str, known: Sequence[str]) -> ApiError:
    return ApiError(
        404,
        f"The model '{name}' does not exist; this server hosts: {', '.join(known) or 'no models'}",
        param="model",
        code="model_not_found",
    )


def model_unavailable(name: str, state: str, error: str = "") -> ApiError:
    if state == "loading":
        return ApiError(
            503,
            f"model '{name}' is loading; retry shortly",
            "service_unavailable",
            code="model_loading",
            retry_after=RETRY_LOADING_S,
        )
    why = f": {error}" if error else ""
    return ApiError(
        503,
        f"model '{name}' is {state}{why}; load it with POST /admin/models/{name}/load",
        "service_unavailable",
        code="model_not_loaded",
        retry_after=RETRY_LOADING_S,
    )


def queue_full(name: str, limit: int) -> ApiError:
    return ApiError(
        429,
        f"model '{name}' already has {limit} requests in flight; retry shortly",
        "rate_limit_error",
        code="queue_full",
        retry_after=RETRY_QUEUE_FULL_S,
    )


def from_request_error(e: RequestError) -> ApiError:
    return ApiError(400, str(e), param=e.param, code="invalid_value")


def from_host_error(e: HostRequestError | HostUnavailableError, model: str) -> ApiError:
    if isinstance(e, HostUnavailableError):
        return ApiError(500, f"the model host is not running ({e})", "server_error", code="host_unavailable")
    f = e.failure
    if f.kind == "invalid":
        return ApiError(400, f.message, param=f.param, code="invalid_value")
    if f.kind == "model_not_found":
        return ApiError(404, f.message, param="model", code="model_not_found")
    if f.kind == "queue_full":
        return ApiError(429, f.message, "rate_limit_exceeded", code="queue_full", retry_after=RETRY_LOADING_S)
    if f.kind == "model_not_loaded":
        return ApiError(503, f.message, "service_unavailable", code="model_not_loaded", retry_after=RETRY_LOADING_S)
    return ApiError(500, f"model '{model}' failed: {f.message}", "server_error", code="internal_error")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _loc(loc: Sequence[Any]) -> str:
    """pydantic's ('body', 'messages', 0, 'role') -> 'messages[0].role'. A union's member tag ('stop', 'list[str]')
    is not a field and ends the path."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and part.split("[")[0].lower() in _TYPE_TAGS:
            break
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def from_validation(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc(first.get("loc", ())) or None
    # pydantic reports one error per union member for `stop` or `prompt`; the first says enough.
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    where = f"{param}: " if param else ""
    return ApiError(400, f"{where}{first.get('msg', 'invalid value')}{more}", param=param, code="invalid_value")


def install(app: FastAPI) -> None:
    """Route every error through the OpenAI format."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return from_validation(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        return ApiError(e.status_code, str(e.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return ApiError(500, f"internal server error: {type(e).__name__}", "server_error").response()
