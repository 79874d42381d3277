"""bench/probes/delivery.py end to end on the CPU: a stand-in host process streams tokens to HostClient's asyncio
clients, every token arrives once, after it was sent, and requests end at max_tokens."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "probes"))

from delivery import connect, drive

from llmhost.host.messages import Shutdown


def test_tokens_stream_from_the_stand_in_host_to_the_clients() -> None:
    steps = {"fast": 0.002, "slow": 0.006}
    client, proc = connect(steps)
    try:
        seen, gaps = asyncio.run(drive(client, 0.6, list(steps), clients=2, max_tokens=5))
    finally:
        client._outbox.put(Shutdown())
        proc.join(5)
    assert not proc.is_alive()
    for model in steps:
        assert len(seen[model]) >= 10, "several five-token requests per client"
        assert all(arrived >= sent > 0 for arrived, sent in seen[model])
        assert all(gap > 0 for _, gap in gaps[model])
    # the faster model's requests end sooner: more of its tokens in the same time
    assert len(seen["fast"]) > len(seen["slow"])
