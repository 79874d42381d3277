"""bench/multi_model_drivers.stream_stats on made-up client streams: tokens and gaps in the window, and the time to
first token of the requests submitted in it (the figure that shows a model whose prompts wait)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from multi_model_drivers import Stream, stream_stats


def test_time_to_first_token_counts_requests_submitted_in_the_window() -> None:
    streams = [
        Stream("m", 4, submitted=0.5, times=[0.6, 1.1, 1.2]),  # submitted before the window: no TTFT counted
        Stream("m", 4, submitted=1.0, times=[1.05, 1.06, 1.08]),  # 50 ms to its first token
        Stream("m", 4, submitted=1.5, times=[1.75]),  # 250 ms
        Stream("m", 4, submitted=1.9, times=[]),  # still waiting at the end: no first token to count
        Stream("m", 4, submitted=1.95, times=[2.01]),  # its first token after the window: pending in it
    ]
    out = stream_stats(streams, 1.0, 2.0)
    assert out["first_token_pending"] == 2
    assert out["tokens"] == 6  # 1.1, 1.2, 1.05, 1.06, 1.08, 1.75
    assert out["ttft_ms"]["n"] == 2
    assert round(out["ttft_ms"]["mean"], 3) == 150.0 and round(out["ttft_ms"]["max"], 3) == 250.0
    assert round(out["itl_ms"]["max"], 3) == 500.0  # 0.6 -> 1.1 ends in the window


def test_no_request_submitted_in_the_window_gives_no_ttft() -> None:
    out = stream_stats([Stream("m", 4, submitted=0.0, times=[0.1, 1.5])], 1.0, 2.0)
    assert "ttft_ms" not in out and out["tokens"] == 1 and out["first_token_pending"] == 0


def test_batched_streams_share_each_steps_weights_for_a_lower_bound_on_bytes_read() -> None:
    streams = [Stream("m", 4, submitted=0.0, times=[1.1, 1.2]) for _ in range(2)]  # two rows, two steps
    one_row = stream_stats(streams, 1.0, 2.0, weight_bytes=1000, kv_per_token=10)
    two_rows = stream_stats(streams, 1.0, 2.0, weight_bytes=1000, kv_per_token=10, rows=2)
    kv = 2 * (4 * 10 + 5 * 10)  # each row's two tokens read the KV of positions 0-3, then 0-4
    assert one_row["bytes_per_s"] == 4 * 1000 + kv  # batch-1 reading: the weights once per token
    assert two_rows["bytes_per_s"] == 2 * 1000 + kv  # both steps read the weights once for both rows


def test_the_clients_own_gc_pauses_are_recorded_while_entered() -> None:
    import gc
    import time

    from multi_model_drivers import GcPauses

    t0 = time.monotonic()
    with GcPauses() as pauses:
        gc.collect(1)
        gc.collect(2)
    gc.collect()  # after the exit: not recorded
    t1 = time.monotonic()
    stats = pauses.stats(t0, t1)
    by_generation = stats["n_by_generation"]
    assert (by_generation["1"], by_generation["2"]) == (1, 1)  # (an automatic young collection may come too)
    assert 0.0 < stats["max_ms"] <= stats["total_ms"]
    assert pauses.stats(t1, t1 + 1.0) == {"n_by_generation": {}, "total_ms": 0.0, "max_ms": 0.0}


def test_a_step_of_no_rows_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="rows must be at least 1"):
        stream_stats([], 0.0, 1.0, weight_bytes=1000, rows=0)


def test_rates_by_token_times_do_not_depend_on_where_the_window_falls() -> None:
    """A steady 7.5 ms stream has 133 or 134 tokens in a 1 s window by its phase; by token times it is 133.33/s."""
    counts, rates, reads = set(), set(), set()
    for phase in (0.0, 0.001, 0.004, 0.007):
        stream = Stream("m", 4, submitted=0.0, times=[phase + 0.0075 * k for k in range(400)])
        out = stream_stats([stream], 1.0, 2.0, weight_bytes=1000)
        counts.add(out["tokens"])
        rates.add(out["tokens_per_s_by_times"])
        reads.add(round(out["bytes_per_s_by_times"]))
    assert counts == {133, 134} and rates == {133.33} and reads == {133_333}
