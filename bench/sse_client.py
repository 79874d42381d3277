"""A lean load generator's HTTP: one streaming POST per asyncio connection, its server-sent events with the time
each arrived. Plain asyncio streams and HTTP/1.1 (chunked or length-delimited bodies), nothing else.

Why not httpx: 64 streaming requests from one httpx.AsyncClient reach a server that does nothing but stream
(a FastAPI app under uvicorn) spread over about half a second, the client's own per-request and per-line work in
one event loop; this client's arrive within tens of milliseconds (bench/probes/load_client.py). Through httpx,
bench/serve.py counted that spread as the server's time to first token.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any


class HttpStatusError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


@dataclass(frozen=True)
class Event:
    at: float  # time.perf_counter() when the bytes that completed it arrived
    data: str  # the event's data field (one line; the server sends JSON)


async def post_events(host: str, port: int, path: str, body: dict[str, Any]) -> AsyncIterator[Event]:
    """POST `body` as JSON on a fresh connection and yield the response's `data:` events as they arrive. Raises
    HttpStatusError for a status other than 200 (with the body read whole)."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        await writer.drain()
        status, headers = await _read_head(reader)
        chunks = _chunked(reader) if headers.get("transfer-encoding") == "chunked" else _until_close(reader)
        if status != 200:
            raise HttpStatusError(status, b"".join([c async for c in chunks]).decode(errors="replace"))
        pending = b""
        async for chunk in chunks:
            now = time.perf_counter()
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"data: "):
                    yield Event(now, line[6:].rstrip(b"\r").decode())
    finally:
        writer.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise RuntimeError(f"not an HTTP response: {status_line!r}")
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    return int(parts[1]), headers


async def _chunked(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await reader.readexactly(size)
        await reader.readline()  # the CRLF after each chunk
        yield data


async def _until_close(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while data := await reader.read(65536):
        yield data
