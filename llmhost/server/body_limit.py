"""BodyLimit: refuses request bodies past a size with 413 before they are read, so one huge request cannot hold the
event loop (reading, JSON parsing and tokenizing all run on it) while every other client and /health waits."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmhost.server.errors import ApiError
from llmhost.units import fmt_bytes

# A prompt holds at most max_seq_len tokens: ~4 bytes of English text per token, ~7 as JSON token ids ("128255,"),
# ~12 for text whose every character is \u-escaped. 32 bytes per token leaves room for chat framing and a few
# prompts in one batch; a 128k-token context gives the 4 MiB floor. (A 50 MB chat body held the loop for 48 s.)
BODY_BYTES_PER_TOKEN = 32
MIN_BODY_BYTES = 4 * 2**20


def body_limit(max_seq_lens: Iterable[int]) -> int:
    """The body limit for models with these contexts: enough for the longest one's prompt, never below 4 MiB."""
    return max([MIN_BODY_BYTES, *(BODY_BYTES_PER_TOKEN * n for n in max_seq_lens)])


def too_large(size: int | None, limit: int) -> ApiError:
    """size: the declared Content-Length; None for a body sent without one (refused once it passed the limit)."""
    what = f"is {size:,} bytes," if size is not None else "(sent without Content-Length) is"
    return ApiError(
        413,
        f"the request body {what} over this server's limit of {fmt_bytes(limit)} ({limit:,} bytes); send a shorter "
        "prompt, or split a batch of prompts over several requests",
        code="request_too_large",
    )


class BodyLimit:
    """ASGI middleware. A declared Content-Length over the limit is answered at once, unread; a body without one
    (chunked) is read here up to the limit and handed on whole, or answered 413 as soon as it passes it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None:
            if length > self.limit:
                await too_large(length, self.limit).response()(scope, receive, send)
                return
            # The server reads exactly Content-Length bytes, no more.
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await too_large(None, self.limit).response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed header itself; counted as if absent
    return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """`receive` that first returns `messages`, then the connection's own (a handler waits on it for a disconnect)."""

    async def replayed() -> Message:
        return messages.pop(0) if messages else await receive()

    return replayed
