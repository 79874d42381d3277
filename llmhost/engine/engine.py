"""Engine: one model's inference, driven step by step from outside (DESIGN.md "Engine contract").

    plan = engine.schedule()      # plain data: which sequences, which tokens
    engine.execute(plan, stream)  # launches the forward pass; no host sync needed
    outputs = engine.collect(plan)  # samples, appends tokens, finishes sequences

`generate()` and `stream()` are conveniences that loop over those three calls.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llmhost.config import ModelConfig
from llmhost.engine.attention import AttentionBatch, ChunkMeta
from llmhost.engine.block_manager import BlockManager, WindowBlockManager, blocks_for
from llmhost.engine.gemma3 import Gemma3Model
from llmhost.engine.kv_cache import KVCache
from llmhost.engine.model import DecoderModel, LlamaModel

if TYPE_CHECKING:  # Triton is imported only where decode graphs run: a CPU-only install has none
    from llmhost.engine.decode_runner import DecodeRunner
from llmhost.engine.sampler import make_generator, sample
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.scheduler import Scheduler, StepPlan
from llmhost.engine.sequence import FinishReason
from llmhost.engine.sequence import Sequence as Seq
from llmhost.engine.weights import iter_weights
from llmhost.errors import ConfigError, PromptTooLongError, RequestError, UnsupportedModelError
from llmhost.memory.estimate import (
    ModelSpec,
    default_kv_tokens,
    sliding_kv_blocks,
    step_tokens,
    uses_decode_graphs,
)
from llmhost.model_files.checkpoint import Checkpoint, open_checkpoint
from llmhost.model_files.shape import RUNNABLE

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# shape.architecture -> the model class that runs it.
MODEL_CLASSES: dict[str, type[DecoderModel]] = {
    "llama": LlamaModel,
    "mistral": LlamaModel,
    "qwen2": LlamaModel,
    "qwen3": LlamaModel,
    "gemma3": Gemma3Model,
}
assert set(MODEL_CLASSES) == set(RUNNABLE)


@dataclass(frozen=True)
class TokenOutput:
    """One sequence's result of one step."""

    seq_id: str
    token: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: FinishReason | None  # None while the sequence goes on

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Completion:
    seq_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float | None]


@dataclass(frozen=True)
class MemoryReport:
    """Bytes this engine holds, by category, and what the driver reports for the whole device."""

    device: str
    weights: int
    kv: int
    workspace: int  # the caching allocator's peak beyond weights and KV (activations of the largest step)
    graphs: int
    driver_used: int | None  # device-wide used bytes (cudaMemGetInfo); None on the CPU

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.workspace + self.graphs


class Engine:
    def __init__(
        self,
        model: DecoderModel,
        cache: KVCache,
        config: ModelConfig,
        eos_token_ids: Sequence[int] = (),
        decode_graphs: bool = False,
    ) -> None:
        """decode_graphs: decode steps replay CUDA graphs (DecodeRunner); the cache's last block is then the
        runner's scratch block, never handed to a sequence."""
        managed = cache.num_blocks - 1 if decode_graphs else cache.num_blocks
        if managed * cache.block_size < config.max_seq_len:
            raise ConfigError(
                f"model '{config.name}': the KV pool holds {managed * cache.block_size} tokens, fewer than "
                f"max_seq_len {config.max_seq_len}; raise kv_tokens or lower max_seq_len"
            )
        self.model = model
        self.cache = cache
        self.config = config
        self.device = model.device
        self.eos_token_ids = frozenset(eos_token_ids)
        window = None
        if cache.window is not None:
            # One sequence alone must always be able to take its next token: its window (ceil(window / block) + 1
            # blocks, as the window straddles a block boundary), or its whole length if that is shorter.
            need = min(blocks_for(config.max_seq_len, cache.block_size), -(-cache.window // cache.block_size) + 1)
            if cache.window_blocks < need:
                raise ConfigError(
                    f"model '{config.name}': the sliding-window KV pool holds {cache.window_blocks} blocks, fewer "
                    f"than the {need} one sequence's window of {cache.window} tokens needs; raise kv_tokens"
                )
            window = WindowBlockManager(cache.window_blocks, cache.block_size, cache.window)
        self.blocks = BlockManager(managed, cache.block_size, window)
        self.scheduler = Scheduler(self.blocks, config.max_batch, step_tokens(config))
        self.seqs: dict[str, Seq] = {}
        self._ids = itertools.count()
        self._inflight: dict[int, torch.Tensor] = {}  # id(plan) -> logits of its sampled rows
        self.runner: DecodeRunner | None = None
        if decode_graphs:
            from llmhost.engine.decode_runner import DecodeRunner

            assert isinstance(model, LlamaModel) and cache.window is None
            self.runner = DecodeRunner(model, cache, config.max_batch, config.max_seq_len)
            self.runner.capture()

    @classmethod
    def load(
        cls,
        config: ModelConfig,
        device: str | torch.device = "cpu",
        kv_tokens: int | None = None,
        block_size: int = 16,
        checkpoint: Checkpoint | None = None,
        eos_token_ids: Sequence[int] = (),
        progress: Callable[[int, int], None] | None = None,
    ) -> Engine:
        """Stream weights from the checkpoint onto `device` and allocate the KV pool for `kv_tokens` (default
        max_seq_len x max_batch, as the planner assumes; pass the plan's figure for "fill" models)."""
        device = torch.device(device)
        ckpt = checkpoint or open_checkpoint(config.path)
        dtype = TORCH_DTYPES[config.dtype]
        model_class = MODEL_CLASSES.get(ckpt.shape.architecture)
        if model_class is None:
            raise UnsupportedModelError(
                f"architecture {ckpt.shape.architecture!r} cannot run yet; supported: {', '.join(RUNNABLE)}"
            )
        model = model_class(ckpt.shape, dtype, device, config.max_seq_len)
        total = len(ckpt.tensors)
        weights = iter_weights(ckpt, dtype, device)
        if progress is not None:
            weights = _counting(weights, lambda n: progress(n, total))
        model.load(weights, str(ckpt.path))
        tokens = kv_tokens if kv_tokens is not None else default_kv_tokens(config)
        spec = ModelSpec.from_shape(config, ckpt.shape)
        # Sliding-window layers get their own pool of max_batch windows, as the planner counts them.
        window_blocks = sliding_kv_blocks(spec, tokens, block_size)
        graphs = uses_decode_graphs(spec, device.type == "cuda")
        cache = KVCache(
            ckpt.shape,
            blocks_for(tokens, block_size) + (1 if graphs else 0),  # + the decode runner's scratch block
            block_size,
            TORCH_DTYPES[config.kv_dtype_resolved],
            device,
            window_blocks,
        )
        return cls(model, cache, config, eos_token_ids, decode_graphs=graphs)

    # -- requests -----------------------------------------------------------------------------------------------

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Validate and queue a request; nothing is allocated for an invalid one."""
        params.validate()
        prompt = list(prompt_ids)
        if not prompt:
            raise RequestError("the prompt is empty; send at least one token", "prompt")
        limit = self.config.max_seq_len
        if len(prompt) >= limit:
            raise PromptTooLongError(
                f"the prompt has {len(prompt)} tokens but model '{self.config.name}' allows max_seq_len = {limit} "
                f"tokens in all: send at most {limit - 1} prompt tokens",
                "messages",
            )
        vocab = self.model.shape.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
        seq_id = request_id or f"seq-{next(self._ids)}"
        if seq_id in self.seqs:
            raise RequestError(f"request id {seq_id!r} is already in use", "request_id")
        seq = Seq(
            id=seq_id,
            prompt_ids=prompt,
            params=params,
            generator=make_generator(params.seed, self.device),
            max_new_tokens=min(params.max_tokens, limit - len(prompt)),
            arrival=time.monotonic(),
        )
        self.seqs[seq_id] = seq
        self.scheduler.add(seq)
        return seq_id

    def abort(self, seq_id: str) -> bool:
        """Stop a request and free its KV blocks; False if it is unknown or already finished."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return False
        seq.finish_reason = "abort"
        self.scheduler.finish(seq)
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- the step contract --------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        return self.scheduler.schedule()

    def execute(self, plan: StepPlan, stream: torch.cuda.Stream | None = None) -> None:
        if plan.empty:
            return
        if self.runner is not None and all(len(c.token_ids) == 1 and c.sample for c in plan.chunks):
            # A pure decode step replays a captured graph; prefill (and mixed steps) take the reference path.
            from llmhost.engine.decode_runner import DecodeRow

            decode = [DecodeRow(c.token_ids[0], c.start, c.block_table) for c in plan.chunks]
            ctx0 = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx0:
                self._inflight[id(plan)] = self.runner.run(decode)
            return
        bs = self.cache.block_size
        windowed = self.cache.window is not None
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        metas: list[ChunkMeta] = []
        w_slots: list[int] = []  # the window pool's slots and contexts, for sliding-window layers
        w_metas: list[ChunkMeta] = []
        rows: list[int] = []
        for c in plan.chunks:
            q_start = len(ids)
            ids.extend(c.token_ids)
            for p in range(c.start, c.end):
                positions.append(p)
                slots.append(c.block_table[p // bs] * bs + p % bs)
            blocks = torch.tensor(c.block_table[: blocks_for(c.end, bs)], dtype=torch.int64)
            metas.append(ChunkMeta(q_start, len(c.token_ids), c.end, blocks.to(self.device)))
            if windowed:
                # window_table[j] is logical block window_start + j; the chunk reads from that block's first token.
                first = c.window_start
                w_slots.extend(c.window_table[p // bs - first] * bs + p % bs for p in range(c.start, c.end))
                w_blocks = torch.tensor(c.window_table[: blocks_for(c.end, bs) - first], dtype=torch.int64)
                ctx_start = first * bs
                w_metas.append(
                    ChunkMeta(q_start, len(c.token_ids), c.end - ctx_start, w_blocks.to(self.device), ctx_start)
                )
            if c.sample:
                rows.append(len(ids) - 1)
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            dev = self.device
            window = (
                AttentionBatch(torch.tensor(w_slots, dtype=torch.int64).to(dev), tuple(w_metas)) if windowed else None
            )
            batch = AttentionBatch(torch.tensor(slots, dtype=torch.int64).to(dev), tuple(metas), window)
            logits = self.model.forward(
                torch.tensor(ids, dtype=torch.int64).to(dev),
                torch.tensor(positions, dtype=torch.int64).to(dev),
                batch,
                self.cache,
                torch.tensor(rows, dtype=torch.int64).to(dev),
            )
        self._inflight[id(plan)] = logits

    def collect(self, plan: StepPlan) -> list[TokenOutput]:
        if plan.empty:
            return []
        logits = self._inflight.pop(id(plan))
        self.scheduler.advance(plan)
        sampled = [c for c in plan.chunks if c.sample]
        # A request aborted while its step ran gets nothing; the step's other rows are unaffected.
        live = [(i, self.seqs[c.seq_id]) for i, c in enumerate(sampled) if c.seq_id in self.seqs]
        if not live:
            return []
        seqs = [s for _, s in live]
        result = sample(
            logits[[i for i, _ in live]],
            [s.params for s in seqs],
            [s.generator for s in seqs],
            [s.prompt_ids for s in seqs],
            [s.output_ids for s in seqs],
        )
        outputs = []
        for k, seq in enumerate(seqs):
            token = result.tokens[k]
            seq.output_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
                del self.seqs[seq.id]
            outputs.append(TokenOutput(seq.id, token, result.logprobs[k], result.top_logprobs[k], reason))
        return outputs

    def _finish_reason(self, seq: Seq, token: int) -> FinishReason | None:
        if token in seq.params.stop_token_ids or (token in self.eos_token_ids and not seq.params.ignore_eos):
            return "stop"
        if len(seq.output_ids) >= seq.max_new_tokens:
            return "length"
        return None

    def step(self) -> list[TokenOutput]:
        plan = self.schedule()
        self.execute(plan)
        return self.collect(plan)

    # -- conveniences -------------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Run the prompts together (continuous batching) to completion; results in prompt order."""
        per = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(per)} sampling params", "params")
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, per, strict=True):
                ids.append(self.add_request(p, sp))
        except BaseException:
            for i in ids:  # all or nothing: no request of a rejected batch stays queued
                self.abort(i)
            raise
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        logprobs: dict[str, list[float | None]] = {i: [] for i in ids}
        reasons: dict[str, FinishReason] = {}
        while len(reasons) < len(ids):
            for out in self.step():
                if out.seq_id in tokens:
                    tokens[out.seq_id].append(out.token)
                    logprobs[out.seq_id].append(out.logprob)
                    if out.finish_reason is not None:
                        reasons[out.seq_id] = out.finish_reason
        return [Completion(i, list(p), tokens[i], reasons[i], logprobs[i]) for i, p in zip(ids, prompts, strict=True)]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[TokenOutput]:
        """Yield this request's tokens as they come (other queued requests advance too). The request is validated
        now, not at the first token; closing the iterator early aborts it and frees its blocks."""
        return self._stream(self.add_request(prompt_ids, params))

    def _stream(self, seq_id: str) -> Iterator[TokenOutput]:
        try:
            while seq_id in self.seqs:  # an abort from elsewhere ends the stream too
                for out in self.step():
                    if out.seq_id == seq_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(seq_id)

    def memory_report(self) -> MemoryReport:
        weights = self.model.weight_bytes()
        kv = self.cache.nbytes
        if self.device.type != "cuda":
            return MemoryReport(str(self.device), weights, kv, 0, 0, None)
        # The caching allocator's peak covers weights, KV, the runner's static buffers and graph pool, and the
        # largest eager step; graphs counts the runner's static buffers, workspace the rest.
        peak = torch.cuda.max_memory_reserved(self.device)
        graphs = self.runner.static_bytes if self.runner is not None else 0
        free, total = torch.cuda.mem_get_info(self.device)
        return MemoryReport(str(self.device), weights, kv, max(0, peak - weights - kv - graphs), graphs, total - free)


def _counting(
    items: Iterator[tuple[str, torch.Tensor]], report: Callable[[int], None]
) -> Iterator[tuple[str, torch.Tensor]]:
    for n, item in enumerate(items, 1):
        yield item
        report(n)
