"""Prometheus metrics of the API process, named after vLLM's so existing dashboards carry over (`vllm:` ->
`llmhost:`). Each app owns its registry (never prometheus-client's global one), so two apps in one process (tests)
do not collide.

Names: `llmhost:num_requests_running` / `num_requests_waiting` (sequences in a model's batch / queued in the host),
`prompt_tokens_total`, `generation_tokens_total`, `request_success_total{finished_reason}`, histograms
`time_to_first_token_seconds`, `inter_token_latency_seconds` (vLLM's newer name for what it first called
`time_per_output_token_seconds`: the gap between consecutive tokens of one request, as the API process sees them
arrive), `e2e_request_latency_seconds`, and `kv_cache_usage_perc` (0..1, as vLLM's); each with a `model` label.
Memory: `llmhost:model_memory_bytes{model,device,kind}` and `llmhost:device_memory_bytes{device,kind}` with kind
weights/kv/workspace/graphs (summed over the models on the device), plus total and external for devices.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llmhost.host.messages import ModelStatus
from llmhost.memory.inventory import Inventory

# vLLM's buckets, with finer low ends for GPU decode (a few ms per token).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.2, 0.4, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0)
MEMORY_KINDS = ("weights", "kv", "workspace", "graphs")


@dataclass
class _ModelSeries:
    """One model's labelled children, looked up once: `labels()` per token would cost a dict lookup and a lock."""

    prompt_tokens: Counter
    generation_tokens: Counter
    ttft: Histogram
    itl: Histogram
    e2e: Histogram


@dataclass
class RequestTimer:
    """One request's (one choice's) timestamps, fed as its tokens arrive."""

    series: _ModelSeries
    arrival: float  # time.perf_counter() when the HTTP request came in
    last: float | None = None

    def on_token(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.series.ttft.observe(now - self.arrival)
        else:
            self.series.itl.observe(now - self.last)
        self.last = now
        self.series.generation_tokens.inc()

    def on_finish(self) -> None:
        self.series.e2e.observe(time.perf_counter() - self.arrival)


class Metrics:
    def __init__(self, models: Iterable[str], inventory: Inventory) -> None:
        self.registry = CollectorRegistry()
        self.inventory = inventory
        r = self.registry
        self.running = Gauge("llmhost:num_requests_running", "Sequences in the model's batch", ["model"], registry=r)
        self.waiting = Gauge("llmhost:num_requests_waiting", "Sequences queued in the host", ["model"], registry=r)
        self.prompt_tokens = Counter("llmhost:prompt_tokens", "Prompt tokens received", ["model"], registry=r)
        self.generation_tokens = Counter("llmhost:generation_tokens", "Tokens generated", ["model"], registry=r)
        self.success = Counter(
            "llmhost:request_success", "Finished requests by finish reason", ["model", "finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "llmhost:time_to_first_token_seconds",
            "Arrival at the API to the first token",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "llmhost:inter_token_latency_seconds",
            "Gap between consecutive tokens of one request",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "llmhost:e2e_request_latency_seconds",
            "Arrival at the API to the last token",
            ["model"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.kv_usage = Gauge(
            "llmhost:kv_cache_usage_perc", "Fraction of KV blocks in use (0..1)", ["model"], registry=r
        )
        self.model_memory = Gauge(
            "llmhost:model_memory_bytes", "Bytes a model holds, by kind", ["model", "device", "kind"], registry=r
        )
        self.device_memory = Gauge(
            "llmhost:device_memory_bytes", "Bytes of a device by kind (models summed)", ["device", "kind"], registry=r
        )
        # vLLM's names; gauges here, as the host's figures start again when a model's engine is built again
        self.prefix_queries = Gauge(
            "llmhost:gpu_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", ["model"], registry=r
        )
        self.prefix_hits = Gauge(
            "llmhost:gpu_prefix_cache_hits", "Prompt tokens found in the prefix cache", ["model"], registry=r
        )
        self._series: dict[str, _ModelSeries] = {}
        for name in models:
            # Touch every labelled series so a scrape shows each model before its first request.
            self._series[name] = _ModelSeries(
                self.prompt_tokens.labels(name),
                self.generation_tokens.labels(name),
                self.ttft.labels(name),
                self.itl.labels(name),
                self.e2e.labels(name),
            )
            for g in (self.running, self.waiting, self.kv_usage, self.prefix_queries, self.prefix_hits):
                g.labels(name).set(0)

    def received(self, model: str, prompt_tokens: int) -> None:
        self._series[model].prompt_tokens.inc(prompt_tokens)

    def timer(self, model: str, arrival: float) -> RequestTimer:
        return RequestTimer(self._series[model], arrival)

    def finished(self, model: str, reason: str) -> None:
        self.success.labels(model, reason).inc()

    def update(self, statuses: Iterable[ModelStatus]) -> None:
        """Refresh the gauges from the host's latest status (at scrape time)."""
        self.model_memory.clear()  # a model that was unloaded must not keep reporting its last bytes
        by_device: dict[str, dict[str, int]] = {}
        for d in self.inventory.devices:
            by_device[d.torch_name] = {"total": d.total, "external": d.external, **dict.fromkeys(MEMORY_KINDS, 0)}
        for st in statuses:
            self.running.labels(st.name).set(st.running)
            self.waiting.labels(st.name).set(st.waiting)
            self.kv_usage.labels(st.name).set(st.kv_blocks_used / st.kv_blocks_total if st.kv_blocks_total else 0.0)
            self.prefix_queries.labels(st.name).set(st.prefix_queried_tokens)
            self.prefix_hits.labels(st.name).set(st.prefix_hit_tokens)
            for kind, n in st.memory.items():
                self.model_memory.labels(st.name, st.device, kind).set(n)
                if st.device in by_device:
                    by_device[st.device][kind] = by_device[st.device].get(kind, 0) + n
        for dev, kinds in by_device.items():
            for kind, n in kinds.items():
                self.device_memory.labels(dev, kind).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
