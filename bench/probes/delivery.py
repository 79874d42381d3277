"""Probe (CPU only): how late tokens reach their clients on the way from a host process to HostClient's asyncio
consumers, with no GPU and no engine in the way. A stand-in host process streams tokens for the requests it is sent
at the four-model bench's pace (per model one batch of every running request's token per step: the H100 record's
token gaps together, 4.3 / 9.5 / 19 / 19 ms), each token carrying the time it was sent; the clients, as
bench/multi_model.py drives the host (eight per model, one request after the other), time each token's arrival.
Prints per model the delivery delay (arrival - send: the pipe, HostClient's reader thread, the GIL and the event
loop) and the token gaps the clients saw against the stand-in's own step gaps.

Why: in the H100 four-model step trace a token reached its client 4-17 ms after its step's collection at the p99
(bench/probes/itl_tail.py, client_after_collect_ms), against 3-4 ms on the H200; this splits off the client's part.

Usage: python bench/probes/delivery.py [--seconds 4] [--switch-ms MS] [--out FILE]
(--switch-ms: the client process's sys.setswitchinterval, Python's default 5 ms; the host core sets 0.5 ms in its
own process.)"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from contextlib import aclosing
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # llmhost, where it is not installed

from multi_model_drivers import GcPauses, latency_ms

from llmhost.engine.sampling_params import SamplingParams
from llmhost.host.client import HostClient
from llmhost.host.messages import Abort, Shutdown, Submit, TokenBatch, TokenEvent

# Each model's step interval together (the H100 record's mean token gaps of the four models, in seconds).
STEP_S = {"llama-3.2-1b": 0.0043, "llama-3.2-3b": 0.0095, "llama-3-8b-1": 0.019, "llama-3-8b-2": 0.019}
CLIENTS = 8
MAX_TOKENS = 256


def stand_in_host(conn: Connection, step_s: dict[str, float], sends_to: str | None = None) -> None:
    """Stream a token per step to every running request of each model; a token's logprob field carries the time
    it was sent (time.monotonic, the same clock in every process of a machine). `sends_to`: a file for how long
    each batch's send took and how many tokens it held (the cost a loop pass pays per send), written at the end."""
    sends: list[tuple[float, int]] = []
    conn.send("ready")  # imported and running: the clients' time starts now
    running: dict[str, dict[str, int]] = {m: {} for m in step_s}
    due = {m: time.monotonic() + s for m, s in step_s.items()}
    while True:
        timeout = max(0.0, min(due.values()) - time.monotonic())
        while conn.poll(timeout):
            timeout = 0.0
            msg = conn.recv()
            if isinstance(msg, Shutdown):
                if sends_to:
                    Path(sends_to).write_text(json.dumps(sends))
                return
            if isinstance(msg, Submit):
                running[msg.model][msg.request_id] = msg.params.max_tokens
            elif isinstance(msg, Abort):
                for reqs in running.values():
                    reqs.pop(msg.request_id, None)
        now = time.monotonic()
        stepped: list[tuple[str, bool]] = []  # (request, whether this token is its last)
        for m, reqs in running.items():
            if now < due[m]:
                continue
            due[m] = max(due[m] + step_s[m], now)  # behind schedule: the next step after a whole step's time
            for rid in list(reqs):
                reqs[rid] -= 1
                stepped.append((rid, reqs[rid] == 0))
                if reqs[rid] == 0:
                    del reqs[rid]
        if stepped:
            sent = time.monotonic()  # stamped as the batch goes out
            events = [TokenEvent(rid, 1, sent, None, "length" if last else None) for rid, last in stepped]
            t = time.perf_counter()
            conn.send(TokenBatch(tuple(events)))
            sends.append((time.perf_counter() - t, len(events)))


class _Proc:
    """What HostClient asks of its host process: whether it runs."""

    def __init__(self, proc: mp.process.BaseProcess) -> None:
        self.proc = proc

    def is_alive(self) -> bool:
        return self.proc.is_alive()


def connect(step_s: dict[str, float], sends_to: str | None = None) -> tuple[HostClient, mp.process.BaseProcess]:
    """A HostClient wired to a stand-in host process (its reader and writer threads as HostClient.start makes)."""
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=stand_in_host, args=(theirs, step_s, sends_to), daemon=True)
    proc.start()
    theirs.close()
    if not mine.poll(60.0) or mine.recv() != "ready":
        raise RuntimeError("the stand-in host did not start")
    client = HostClient(cast(Any, None), cast(Any, None))
    client._conn = mine
    client._proc = cast(Any, _Proc(proc))
    threading.Thread(target=client._read, daemon=True).start()
    threading.Thread(target=client._write, daemon=True).start()
    return client, proc


Timed = dict[str, list[tuple[float, float]]]  # per model: (arrival, value)


async def drive(
    client: HostClient, seconds: float, models: list[str], clients: int = CLIENTS, max_tokens: int = MAX_TOKENS
) -> tuple[Timed, Timed]:
    """`clients` per model, one request after the other until `seconds` pass. Per model: (arrival, time sent) of
    every token, and (arrival, gap to the request's previous arrival) of every batch after a request's first."""
    seen: Timed = {m: [] for m in models}
    gaps: Timed = {m: [] for m in models}
    t_end = time.monotonic() + seconds

    async def one(model: str) -> None:
        while time.monotonic() < t_end:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            last = None
            async with aclosing(client.generate_batches(model, [1, 2, 3], params)) as batches:
                async for batch in batches:
                    now = time.monotonic()
                    for ev in batch:
                        seen[model].append((now, ev.logprob or 0.0))
                    if last is not None:
                        gaps[model].append((now, now - last))
                    last = now
                    if now >= t_end:
                        break

    await asyncio.gather(*(one(m) for m in models for _ in range(clients)))
    return seen, gaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--switch-ms", type=float, help="the client process's GIL switch interval")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.switch_ms:
        sys.setswitchinterval(args.switch_ms / 1e3)
    sends_file = str(Path(tempfile.mkdtemp()) / "sends.json")
    client, proc = connect(STEP_S, sends_file)
    warm = 1.0
    with GcPauses() as pauses:
        t0 = time.monotonic()
        seen, gaps = asyncio.run(drive(client, warm + args.seconds, list(STEP_S)))
    client._outbox.put(Shutdown())
    proc.join(5)
    sends = json.loads(Path(sends_file).read_text())
    t_window = t0 + warm
    out: dict[str, Any] = {
        "probe": "token delivery from a stand-in host process to HostClient's asyncio clients (no GPU)",
        "switch_interval_ms": round(sys.getswitchinterval() * 1e3, 3),
        "clients_per_model": CLIENTS,
        "client_gc": pauses.stats(t_window, t0 + warm + args.seconds),
        # what one send costs the sender: pickling a batch and writing it to the pipe (a loop pass pays this)
        "send_ms": latency_ms([d for d, _ in sends]),
        "tokens_per_send": {"mean": round(sum(n for _, n in sends) / len(sends), 1), "max": max(n for _, n in sends)},
        "models": {},
    }
    for m in STEP_S:
        delays = [a - sent for a, sent in seen[m] if a >= t_window]
        out["models"][m] = {
            "step_ms": 1e3 * STEP_S[m],
            "tokens": len(delays),
            "delivery_ms": latency_ms(delays),
            "token_gap_ms": latency_ms([g for a, g in gaps[m] if a >= t_window]),
        }
    out["command"] = "python bench/probes/delivery.py " + " ".join(sys.argv[1:])
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
