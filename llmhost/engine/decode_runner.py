"""DecodeRunner: the GPU decode path. One token per sequence, fused Triton kernels, static buffers, and one CUDA
graph per captured batch size, so a whole decode step replays with no Python on the hot path.

Invariants (a graph holds no reference to what it reads, DESIGN.md):
- every buffer a graph reads or writes is allocated here once and lives as long as the runner;
- a batch of b sequences runs the graph of the smallest captured size >= b; the padded rows read and write a
  scratch KV block the block manager never hands out (the cache's last block), so they cannot touch real data;
- with prompt_tokens > 0 a step may also carry that many prompt rows (a short prompt's tokens, each at its own
  position with its sequence's block table): every row's K/V is written before any row attends, and each row
  attends to positions 0..its own, so the rows of one prompt are its causal prefill. Only the first max_batch rows
  get logits (the caller puts the rows that sample first);
- all graphs share one memory pool, captured largest first, so the pool is the largest batch's activations
  (the estimate's `graphs` term: memory/estimate.py).

The reference forward (model.py) stays the prefill path and the definition of correct: tests compare the two.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from llmhost.engine.kernels.fused import add_rms_norm, rms_norm, rope_write_kv, silu_mul
from llmhost.engine.kernels.gemv import linear
from llmhost.engine.kernels.paged_decode import DecodeWorkspace, paged_decode_attention
from llmhost.engine.kv_cache import KVCache
from llmhost.engine.model import LlamaModel
from llmhost.engine.model import rms_norm as rms_norm_reference
from llmhost.memory.estimate import graph_step_sizes

log = logging.getLogger("llmhost.engine")

# Fixed: graphs of different models replay at the same time on two streams (host/core.py; the threads of
# bench/multi_model.py). cuBLAS keeps one workspace per (handle, stream), and a captured GEMM keeps the workspace of
# the stream it was captured on: on torch's single default capture stream every model's graphs shared one
# workspace, and concurrent replays raced on it (hangs on the lent H100). One capture stream per model gives each
# its own; kept per model, so a runner rebuilt after a swap-in reuses it rather than allocating another workspace.
_CAPTURE_STREAMS: weakref.WeakKeyDictionary[LlamaModel, torch.cuda.Stream] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class DecodeRow:
    token: int  # ignored when `feed` names a row of `DecodeRunner.sampled`
    position: int  # of `token`; it attends to positions 0..position
    block_table: tuple[int, ...]
    # The row of `sampled` that holds this row's token on the device: the previous step's sampled tokens feed this
    # one without a trip through the host (the engine runs a step ahead, engine.py); -1: `token` is known.
    feed: int = -1


class DecodeRunner:
    def __init__(
        self,
        model: LlamaModel,
        cache: KVCache,
        max_batch: int,
        max_seq_len: int,
        capture_on_demand: bool = False,
        prompt_tokens: int = 0,
    ) -> None:
        """capture_on_demand: capture each batch size the first time it runs (a model swapped back in starts
        decoding after one size's capture, not all of them). prompt_tokens: prompt rows a step may carry beside a
        full batch (ModelConfig.graph_prompt_tokens)."""
        s = model.shape
        self.capture_on_demand = capture_on_demand
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.scratch_block = cache.num_blocks - 1  # reserved: the engine's block manager never hands it out
        self.sizes = graph_step_sizes(max_batch, prompt_tokens)
        self.max_batch = max_batch  # rows that may sample: the logits' rows
        self.prompt_tokens = prompt_tokens
        self.rows = max_batch + prompt_tokens  # rows a step may have
        dev, dt = model.device, model.dtype
        self.max_blocks = -(-max_seq_len // cache.block_size)
        mb, rows = max_batch, self.rows
        # Static inputs, written before each replay: rows of `inputs` are tokens, where each row's token comes
        # from, positions, KV slots and context lengths. The host fills pinned mirrors with numpy and sends each
        # with one asynchronous copy. `sampled` (the engine's tokens of the previous step, written on the device)
        # sits just before them in one buffer, so one gather picks each row's token from either.
        self._ids = torch.zeros(mb + 5 * rows, dtype=torch.int64, device=dev)
        self.sampled = self._ids[:mb]
        self.inputs = self._ids[mb:].view(5, rows)
        self.tokens, self.source, self.positions, self.slots, self.lens = self.inputs.unbind(0)
        self.tables = torch.zeros(rows, self.max_blocks, dtype=torch.int32, device=dev)
        pin = dev.type == "cuda"
        self._host_inputs = torch.zeros(5, rows, dtype=torch.int64, pin_memory=pin)
        self._host_tables = torch.zeros(rows, self.max_blocks, dtype=torch.int32, pin_memory=pin)
        self._copied = torch.cuda.Event() if pin else None  # type: ignore[no-untyped-call]
        # Static activations.
        q_dim = s.num_heads * s.head_dim
        self.h = torch.zeros(rows, s.hidden_size, dtype=dt, device=dev)
        self.x = torch.zeros(rows, s.hidden_size, dtype=dt, device=dev)
        self.qkv = torch.zeros(rows, q_dim + 2 * s.num_kv_heads * s.head_dim, dtype=dt, device=dev)
        self.attn = torch.zeros(rows, s.num_heads, s.head_dim, dtype=dt, device=dev)
        self.act = torch.zeros(rows, s.intermediate_size, dtype=dt, device=dev)
        self.logits = torch.zeros(mb, s.vocab_size, dtype=torch.float32, device=dev)
        self.ws = DecodeWorkspace(rows, s.num_heads, s.head_dim, max_seq_len, dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool: Any = None  # the shared graph memory pool handle, set by the first capture
        # Graph sets confined to part of the GPU's SMs (sm_partition.py), captured ahead on a stream of each
        # count, for batch sizes up to their max_rows (the steps that run beside other models'); `sms` picks the
        # set replayed, None the whole GPU. Selecting costs nothing: capturing a level's whole set in the loop
        # when the host changed its mind stalled every model 100-200 ms (bench/results/
        # multi_model_sm_steering-h100.json). A runner that captures on demand (swapped back in) takes one graph
        # at a time, at its first replay, as it does its whole-GPU graphs.
        self.confined: dict[int, dict[int, torch.cuda.CUDAGraph]] = {}
        self.sms: int | None = None
        self._confined_streams: dict[int, torch.cuda.Stream] = {}  # SM count -> its confined capture stream
        self._confined_rows = 0  # the largest batch size captured confined
        self.confined_failed = False  # an on-demand confined capture failed: whole-GPU graphs for good

    def capture_confined(self, streams: dict[int, torch.cuda.Stream], max_rows: int) -> None:
        """Capture the batch sizes up to `max_rows` once more for each SM count, on its confined stream (a graph
        captured on one runs on its SMs wherever it is replayed), into the shared pool. A runner that captures on
        demand (swapped back in) captures each the first time it runs, as it does its whole-GPU graphs: a swap-in
        then takes no capture (16 confined graphs of a 14B model: 0.17 s on the H200)."""
        self._confined_streams.update(streams)
        self._confined_rows = max_rows
        for sms, stream in streams.items():
            graphs = self.confined.setdefault(sms, {})
            if self.capture_on_demand:
                continue
            for b in sorted((b for b in self.sizes if b <= max_rows), reverse=True):
                if b not in graphs:
                    graphs[b] = self._capture_graph(b, stream)

    def _capture_confined_now(self, b: int) -> None:
        """Capture batch size `b` confined to the selected SM count, the first time it runs there. A failure
        (memory short for one more graph) leaves this runner on the whole GPU's graphs for good: steering only
        moves bandwidth, the step must not fail for it."""
        assert self.sms is not None
        confined = self.confined[self.sms]
        if b in confined:
            return
        try:
            confined[b] = self._capture_graph(b, self._confined_streams[self.sms])
        except torch.cuda.OutOfMemoryError as e:
            log.warning("confined decode graph of %d rows not captured (%s): whole-GPU graphs from now on", b, e)
            self.drop_confined()
            self.confined_failed = True

    def select(self, sms: int | None) -> None:
        """Replay the graphs confined to `sms` SMs from now on (a set captured by capture_confined), or None: the
        whole GPU's. Batch sizes without a confined graph replay the whole GPU's; so does every size once an
        on-demand capture failed (confined_failed)."""
        if self.confined_failed:
            return
        if sms is not None and sms not in self.confined:
            raise ValueError(f"no graphs confined to {sms} SMs were captured")
        self.sms = sms

    def drop_confined(self) -> None:
        """Back to the whole GPU's graphs for good: the confined sets are released (their executables; what they
        took of the shared pool stays in it)."""
        self.sms = None
        self.confined.clear()
        self._confined_streams.clear()

    @property
    def static_bytes(self) -> int:
        tensors = [self._ids, self.tables, self.h, self.x, self.qkv]
        tensors += [self.attn, self.act, self.logits]
        return sum(t.numel() * t.element_size() for t in tensors) + self.ws.nbytes

    # -- the step ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _forward(self, b: int) -> None:
        """One decode step over the first b rows of the static buffers; the logits of the first max_batch of
        them land in self.logits."""
        m = self.model
        s = m.shape
        eps = s.rms_norm_eps
        q_dim = s.num_heads * s.head_dim
        h, x, qkv, attn, act = self.h[:b], self.x[:b], self.qkv[:b], self.attn[:b], self.act[:b]
        # source[r] indexes _ids: a row of `sampled` (fed from the previous step) or the row's own staged token.
        torch.index_select(m.embed, 0, self._ids[self.source[:b]], out=h)
        for i, lw in enumerate(m.layers):
            if i == 0:
                rms_norm(h, lw.input_norm, eps, out=x)
            # (for later layers the previous layer's add_rms_norm already left input_norm(h) in x)
            linear(x, lw.qkv, out=qkv)
            if lw.qkv_bias is not None:
                qkv.add_(lw.qkv_bias)
            if lw.q_norm is not None and lw.k_norm is not None:
                kv_dim = s.num_kv_heads * s.head_dim
                q = qkv[:, :q_dim].view(b, s.num_heads, s.head_dim)
                k = qkv[:, q_dim : q_dim + kv_dim].view(b, s.num_kv_heads, s.head_dim)
                q.copy_(rms_norm_reference(q, lw.q_norm, eps))
                k.copy_(rms_norm_reference(k, lw.k_norm, eps))
            rope_write_kv(
                qkv, self.positions[:b], m.inv_freq, self.slots[:b], self.cache.k[i], self.cache.v[i],
                s.num_heads, s.num_kv_heads,
            )  # fmt: skip
            q = qkv[:, :q_dim].view(b, s.num_heads, s.head_dim)
            paged_decode_attention(
                q, self.cache.k[i], self.cache.v[i], self.tables[:b], self.lens[:b], m.scale, self.ws, out=attn
            )
            o = linear(attn.view(b, q_dim), lw.o)
            add_rms_norm(o, h, lw.post_attn_norm, eps, out=x)
            gate_up = linear(x, lw.gate_up)
            silu_mul(gate_up, out=act)
            down = linear(act, lw.down)
            nxt = m.layers[i + 1].input_norm if i + 1 < len(m.layers) else m.norm
            add_rms_norm(down, h, nxt, eps, out=x)
        nl = min(b, self.max_batch)  # prompt rows past the rows that sample need no logits
        linear(x[:nl], m.lm_head, out=self.logits[:nl])  # float32 logits of the bf16 product, as the reference

    def run(self, rows: list[DecodeRow]) -> torch.Tensor:
        """Decode one token for each row; returns float32 logits of the first min(len(rows), max_batch) rows [n,
        vocab] (a view of a static buffer, valid until the next call)."""
        b = len(rows)
        if b > self.rows:
            raise ValueError(f"{b} rows for a decode runner of {self.rows} ({self.prompt_tokens} prompt rows)")
        padded = next(size for size in self.sizes if size >= b)
        if self.capture_on_demand and padded not in self.graphs:
            self._capture(padded)
        if self.capture_on_demand and self.sms is not None and padded <= self._confined_rows:
            self._capture_confined_now(padded)
        self._stage(rows, padded)
        graph = self.confined[self.sms].get(padded) if self.sms is not None else None
        graph = graph or self.graphs.get(padded)
        if graph is not None:
            graph.replay()
        else:
            self._forward(padded)
        return self.logits[: min(b, self.max_batch)]

    def _stage(self, rows: list[DecodeRow], padded: int) -> None:
        """Write the inputs of `rows`, and padding up to `padded` rows, into the static input buffers."""
        bs = self.block_size
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy must have left the pinned buffers
        host = self._host_inputs.numpy()
        tables = self._host_tables.numpy()
        mb = self.max_batch
        # Padded rows decode a dummy token at position 0 of the scratch block: they touch nothing real.
        host[:, :padded] = ((0,), (0,), (0,), (self.scratch_block * bs,), (1,))
        host[1, :padded] = range(mb, mb + padded)  # each row's own staged token (its index in _ids)
        tables[:padded] = self.scratch_block
        for r, row in enumerate(rows):
            host[0, r] = row.token
            if row.feed >= 0:
                host[1, r] = row.feed
            host[2, r] = row.position
            host[3, r] = row.block_table[row.position // bs] * bs + row.position % bs
            host[4, r] = row.position + 1
            tables[r, : len(row.block_table)] = row.block_table
        self.inputs[:, :padded].copy_(self._host_inputs[:, :padded], non_blocking=True)
        self.tables[:padded].copy_(self._host_tables[:padded], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def capture(self) -> None:
        """Capture every batch size, largest first, into one shared pool."""
        for b in sorted(self.sizes, reverse=True):
            self._capture(b)

    def _capture(self, b: int) -> None:
        stream = _CAPTURE_STREAMS.get(self.model)
        if stream is None:
            stream = _CAPTURE_STREAMS[self.model] = torch.cuda.Stream(self.model.device)  # type: ignore[no-untyped-call]
        self.graphs[b] = self._capture_graph(b, stream)

    def _capture_graph(self, b: int, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
        self._stage([], b)  # padding inputs: capture must not touch real cache blocks
        self._forward(b)  # warm-up: compiles the kernels and lets cuBLAS pick its algorithms
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool, stream=stream):
            self._forward(b)
        self.pool = g.pool()
        torch.cuda.synchronize()
        return g
