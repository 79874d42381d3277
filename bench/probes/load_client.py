"""Probe: how long N streaming requests sent at once take to reach a server that does nothing but stream, from one
httpx.AsyncClient and from bench/sse_client.py (one asyncio connection each). The server (a FastAPI app under
uvicorn, in its own process, as `llmhost serve` runs) notes each request's arrival and streams one SSE event per
tick to every request, as a batch-64 decode would; the spread of arrivals is the load generator's, not a server's.

Usage: python bench/probes/load_client.py [--clients 64] [--tick-ms 8] [--tokens 256] [--out FILE]
Needs fastapi, uvicorn and httpx. Prints JSON: per client, arrival times (s after the start) first/p50/last, and
the first token p50/last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# FastAPI's names at module level: it resolves the handlers' (string) annotations in this module's globals.
import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from sse_client import post_events


def _serve(port: int, tick_s: float) -> None:
    app = FastAPI()
    arrivals: list[float] = []

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        arrivals.append(time.perf_counter())  # CLOCK_MONOTONIC: comparable across processes on Linux

        async def events() -> Any:
            for _ in range(body["max_tokens"]):
                await asyncio.sleep(tick_s)
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": "x"}]}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/arrivals")
    async def taken() -> list[float]:
        out = list(arrivals)
        arrivals.clear()
        return out

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _body(tokens: int) -> dict[str, Any]:
    return {"model": "probe", "prompt": [1] * 128, "max_tokens": tokens, "stream": True}


async def _httpx_run(port: int, clients: int, tokens: int) -> tuple[float, list[list[float]]]:
    async def one(client: httpx.AsyncClient, n: int) -> list[float]:
        times: list[float] = []
        async with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=_body(n)) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    times.append(time.perf_counter())
                    json.loads(line[6:])
        return times

    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(one(client, 8) for _ in range(clients)))  # warm, as bench/serve.py does
        _arrivals(port)
        start = time.perf_counter()
        return start, await asyncio.gather(*(one(client, tokens) for _ in range(clients)))


async def _lean_run(port: int, clients: int, tokens: int) -> tuple[float, list[list[float]]]:
    async def one(n: int) -> list[float]:
        times: list[float] = []
        async for event in post_events("127.0.0.1", port, "/v1/completions", _body(n)):
            if event.data != "[DONE]":
                times.append(event.at)
                json.loads(event.data)
        return times

    await asyncio.gather(*(one(8) for _ in range(clients)))
    _arrivals(port)
    start = time.perf_counter()
    return start, await asyncio.gather(*(one(tokens) for _ in range(clients)))


def _arrivals(port: int) -> list[float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/arrivals", timeout=10) as r:
        out: list[float] = json.load(r)
    return out


def _measure(name: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    runner = _httpx_run if name == "httpx" else _lean_run
    # Each runner warms up (every client once, as bench/serve.py does), then returns when it sent the measured batch.
    start, results = asyncio.run(runner(port, args.clients, args.tokens))
    arrived = sorted(a - start for a in _arrivals(port))
    firsts = sorted(r[0] - start for r in results)
    return {
        "arrival_first_s": round(arrived[0], 4),
        "arrival_p50_s": round(arrived[len(arrived) // 2], 4),
        "arrival_last_s": round(arrived[-1], 4),
        "arrival_spread_s": round(arrived[-1] - arrived[0], 4),
        "first_token_p50_s": round(firsts[len(firsts) // 2], 4),
        "first_token_last_s": round(firsts[-1], 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--tick-ms", type=float, default=8.0, help="one SSE event per stream per tick")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(port, args.tick_ms / 1e3))
    server.start()
    try:
        for _ in range(100):
            try:
                _arrivals(port)
                break
            except OSError:
                time.sleep(0.1)
        doc = {
            "probe": "load_client",
            "clients": args.clients,
            "tick_ms": args.tick_ms,
            "tokens": args.tokens,
            "httpx": _measure("httpx", port, args),
            "sse_client": _measure("sse_client", port, args),
        }
    finally:
        server.terminate()
        server.join(10)
    print(json.dumps(doc, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
