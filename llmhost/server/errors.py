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
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmhost.errors import RequestError
from llmhost.host.client import HostRequestError, HostUnavailableError

log = logging.getLogger("llmhost.server")

RETRY_LOADING_S = 5  # a model being loaded: long enough for a small model, short enough not to idle
RETRY_QUEUE_FULL_S = 1  # a full queue drains at decode speed
# The type of every 429: OpenAI's word for it (its `code`); the SDKs raise RateLimitError from the status alone.
RATE_LIMIT_TYPE = "rate_limit_exceeded"


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

    def response(self) -> Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        # ASCII JSON: a message may quote what the client sent (a model name), and a lone surrogate in it would
        # make a UTF-8 encoder (JSONResponse's) raise while the error is being answered.
        body = json.dumps(self.body(), separators=(",", ":"))
        return Response(body, self.status, headers, media_type="application/json")

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


def queue_full(message: str) -> ApiError:
    """429 for a full queue, in the API's gate or the host's, answered alike: retrying succeeds once sequences
    finish (the API checks first that the request fits in an empty queue at all)."""
    return ApiError(429, message, RATE_LIMIT_TYPE, code="queue_full", retry_after=RETRY_QUEUE_FULL_S)


def too_many_sequences(name: str, prompts: int, n: int, limit: int) -> ApiError:
    """A request asking for more sequences at once than the model ever has in flight: 400, as retrying cannot
    help (a 429 would send clients into a retry loop that never ends)."""
    asked = f"{prompts} prompts x n = {n} = {prompts * n} sequences" if prompts > 1 else f"n = {n} sequences"
    if prompts > limit:
        param, fix = "prompt", f"send at most {limit} prompts per request"
    else:
        param, fix = "n", f"send n <= {limit // prompts}" + (" or fewer prompts" if prompts > 1 else "")
    return ApiError(
        400,
        f"the request asks for {asked} at once, but model '{name}' takes at most {limit} in flight; {fix}",
        param=param,
        code="invalid_value",
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
        return queue_full(f.message)
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


def invalid_body(message: str) -> ApiError:
    """The body as a whole is unusable (not JSON, not an object, empty): no one field is at fault."""
    return ApiError(400, message, code="invalid_json")


def from_validation(
    errors: Sequence[Mapping[str, Any]], body: Any = None, expected: str = "", content_type: str = ""
) -> ApiError:
    """body: what FastAPI parsed, or the text it could not parse; expected: the fields the route needs, for a
    message about a body that is missing or not an object; content_type: the request's header."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return _invalid_json(first, loc, body)
    if loc == ("body",):
        return _not_an_object(first, expected or "the route's fields", content_type)
    param = _loc(loc) or None
    # pydantic reports one error per union member for `stop` or `prompt`; the first says enough.
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    where = f"{param}: " if param else ""
    return ApiError(400, f"{where}{first.get('msg', 'invalid value')}{more}", param=param, code="invalid_value")


def _invalid_json(error: Mapping[str, Any], loc: tuple[Any, ...], doc: Any) -> ApiError:
    reason = (error.get("ctx") or {}).get("error", "JSON decode error")
    pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    where = ""
    if pos is not None and isinstance(doc, str):
        line = doc.count("\n", 0, pos) + 1
        column = pos - doc.rfind("\n", 0, pos)  # 1-based, as json's own messages count
        where = f" at line {line}, column {column} (char {pos})"
    elif pos is not None:
        where = f" at char {pos}"
    return invalid_body(f"the body is not valid JSON: {reason}{where}; send one JSON object")


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _not_an_object(error: Mapping[str, Any], expected: str, content_type: str) -> ApiError:
    send = f"send a JSON object with {expected}, with Content-Type: application/json"
    if error.get("type") == "missing":
        return invalid_body(f"the request body is empty; {send}")
    value = error.get("input")
    if isinstance(value, bytes | bytearray):  # FastAPI parses JSON only when the Content-Type says so (or is absent)
        return invalid_body(f"the request body was sent as Content-Type '{content_type}', which is not JSON; {send}")
    kind = "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)
    return invalid_body(f"the request body is {kind}, not a JSON object; {send}")


def from_body_parse_error(cause: BaseException | None) -> ApiError:
    """FastAPI's "There was an error parsing the body" (a 400 raised from the parser's exception), made specific."""
    if isinstance(cause, UnicodeDecodeError):
        return invalid_body(
            f"the body is not valid UTF-8 ({cause.reason} at byte {cause.start}); send JSON text encoded as UTF-8"
        )
    if isinstance(cause, RecursionError):
        return invalid_body("the body's JSON nests arrays or objects too deeply to parse; send a flatter object")
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        # Python refuses to parse integers of more than 4300 digits (a guard against quadratic-time parsing).
        return invalid_body("the body's JSON holds an integer of more than 4300 digits; send numbers of sane size")
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return invalid_body(f"the body could not be parsed as JSON{why}; send one JSON object, UTF-8 encoded")


def _expected_fields(path: str) -> str:
    if path.endswith("/chat/completions"):
        return "'model' and 'messages'"
    if path.endswith("/completions"):
        return "'model' and 'prompt'"
    return "the route's fields"


def install(app: FastAPI) -> None:
    """Route every error through the OpenAI format."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError) -> Response:
        return e.response()

    @app.exception_handler(RequestError)
    async def _request(_: Request, e: RequestError) -> Response:
        # Raised by the request models' own checks (openai_schema.py), which name the field themselves.
        return from_request_error(e).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> Response:
        content_type = request.headers.get("content-type", "")
        return from_validation(e.errors(), e.body, _expected_fields(request.url.path), content_type).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> Response:
        if e.status_code == 400 and e.__cause__ is not None:
            return from_body_parse_error(e.__cause__).response()
        where = f"{request.method} {request.url.path}"
        if e.status_code == 404:
            routes = "/v1/models, /v1/chat/completions, /v1/completions, /health, /metrics, /admin/ps"
            return ApiError(404, f"no route {where}; this server serves {routes}", code="not_found").response()
        if e.status_code == 405:
            allow = (e.headers or {}).get("Allow", "")
            message = f"{where} is not allowed; this path takes {allow or 'other methods'}"
            return ApiError(405, message, code="method_not_allowed").response()
        return ApiError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> Response:
        log.exception("internal error")
        return ApiError(500, f"internal server error: {type(e).__name__}", "server_error").response()
