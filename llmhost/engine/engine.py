"""Engine: one model's inference, driven step by step from outside (DESIGN.md "Engine contract").

    plan = engine.schedule()      # plain data: which sequences, which tokens
    engine.execute(plan, stream)  # launches the forward pass and the sampling; no host sync needed
    outputs = engine.collect(plan)  # reads the tokens back, appends them, finishes sequences

`step()` runs ahead: with a decode graph runner, it schedules and launches step N+1 before reading step N's tokens.
Step N's sampled tokens stay on the device and feed step N+1 there (DecodeRunner's `sampled`), each sequence
carrying its one unread token as `pending`; the host's bookkeeping for step N+1 then overlaps the GPU running
step N. A sequence that step N finishes (a stop token) wastes its row of step N+1, which is discarded. Steps run
ahead only after steps whose rows ask for no logprobs and no penalties: those need step N's logits or token
history on the host. `generate()` and `stream()` are conveniences that loop over `step()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from llmhost.config import ModelConfig
from llmhost.engine.block_manager import BlockManager, WindowBlockManager, blocks_for
from llmhost.engine.gemma3 import Gemma3Model
from llmhost.engine.kv_cache import KVCache
from llmhost.engine.model import DecoderModel, LlamaModel, StageInputs
from llmhost.engine.placement import LayerPlacement, StageSpec

if TYPE_CHECKING:  # Triton is imported only where decode graphs run: a CPU-only install has none
    from llmhost.engine.decode_runner import DecodeRow, DecodeRunner
from llmhost.engine.prompt_scores import PendingScores, PromptLogprob, scored_rows
from llmhost.engine.sampler import PendingSample, launch_sample, make_generator
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.scheduler import Chunk, Scheduler, StepPlan
from llmhost.engine.sequence import PENDING_TOKEN, FinishReason, SeqStatus
from llmhost.engine.sequence import Sequence as Seq
from llmhost.engine.slices import Slices, drain, each_in
from llmhost.engine.step_inputs import DeviceStep, StepInputs, to_device
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
    # With a request's first token when it asked for prompt logprobs: one per prompt token, None for the first
    # (nothing predicts it)
    prompt_logprobs: list[PromptLogprob | None] | None = None

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
    prompt_logprobs: list[PromptLogprob | None] | None = None  # when asked (SamplingParams.prompt_logprobs)


@dataclass
class _Launched:
    """A step between execute and collect: the sequences it samples for, in the order of the plan's sampled chunks
    (less any aborted before the step launched), and their tokens on the way to the host (None when there are
    none)."""

    seqs: list[Seq]
    sample: PendingSample | None
    advanced: bool = False  # the scheduler already counted its tokens as computed (the engine ran ahead)
    scores: list[PendingScores] = field(default_factory=list)  # prompt logprobs of its chunks, where asked


@dataclass(frozen=True)
class MemoryReport:
    """Bytes this engine holds, by category, and what the driver reports for the whole device (a split model's
    memory_report() sums its devices: device names them all, joined by commas)."""

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
        cache: KVCache | Sequence[KVCache],
        config: ModelConfig,
        eos_token_ids: Sequence[int] = (),
        decode_graphs: bool = False,
    ) -> None:
        """cache: the KV cache, or one per stage of a split model (each holding that stage's layers on its
        device, all with the same blocks: one block manager's ids address every stage's pools alike).
        decode_graphs: decode steps replay CUDA graphs (DecodeRunner); the cache's last block is then the
        runner's scratch block, never handed to a sequence."""
        caches = (cache,) if isinstance(cache, KVCache) else tuple(cache)
        _check_caches(model.placement, caches)
        if decode_graphs and model.placement.split:
            # The decode runner captures one device's kernels and buffers; a split model decodes eagerly.
            raise ValueError("decode graphs run a model on one device; a split model decodes eagerly")
        cache = caches[0]
        managed = cache.num_blocks - 1 if decode_graphs else cache.num_blocks
        if managed * cache.block_size < config.max_seq_len:
            raise ConfigError(
                f"model '{config.name}': the KV pool holds {managed * cache.block_size} tokens, fewer than "
                f"max_seq_len {config.max_seq_len}; raise kv_tokens or lower max_seq_len"
            )
        self.model = model
        self.placement = model.placement
        self.caches = caches  # one per stage, in stage order
        self.cache = cache  # the first stage's (the only one unless split); its geometry is every stage's
        self.config = config
        self.device = model.device  # the first stage's; logits (and samplers' generators) live on the last
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
        self.blocks = BlockManager(managed, cache.block_size, window, prefix_cache=config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_batch, step_tokens(config))
        self.seqs: dict[str, Seq] = {}
        self._ids = itertools.count()
        self._inflight: dict[int, _Launched] = {}  # id(plan) -> what collect needs
        # id(plan) -> the sequences with a chunk in it, counted in their `inflight` from its first kernel on
        self._writers: dict[int, list[Seq]] = {}
        self._feed_rows: dict[str, int] = {}  # seq id -> row of the runner's `sampled` holding its pending token
        self._ahead: StepPlan | None = None  # launched by step() before the previous step was read
        self.runner: DecodeRunner | None = None
        self.graphs_wanted = decode_graphs  # a parked engine has no runner; unpark rebuilds it when this is set
        if decode_graphs:
            from llmhost.engine.decode_runner import DecodeRunner

            assert isinstance(model, LlamaModel) and cache.window is None
            with self._on_device():
                self.runner = DecodeRunner(
                    model, cache, config.max_batch, config.max_seq_len, prompt_tokens=config.prompt_rows
                )
                if self.device.type == "cuda":  # on a CPU (tests) the runner steps without graphs
                    self.runner.capture()
        if self.device.type == "cuda":
            from llmhost.engine.matmul_warmup import warm_matmuls

            with torch.inference_mode():
                warm_matmuls(model, step_tokens(config), config.max_batch)

    def _on_device(self) -> contextlib.AbstractContextManager[object]:
        """The model's GPU as the current device, for the decode runner: CUDA graph capture and replay and Triton
        launches use the current device's stream, not the tensors' device (an engine on cuda:1 would otherwise
        capture and launch on cuda:0). The eager path needs none: torch ops run on their tensors' device."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.device(self.device)

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
        stages: Sequence[StageSpec] | LayerPlacement | None = None,
    ) -> Engine:
        """Stream weights from the checkpoint onto `device` and allocate the KV pool for `kv_tokens` (default
        max_seq_len x max_batch, as the planner assumes; pass the plan's figure for "fill" models).
        stages: split the model, [(device, start, end), ...] (or a LayerPlacement, e.g. from_plan): layers
        [start, end) with their weights and KV pool on that device; `device` is then unused."""
        ckpt = checkpoint or open_checkpoint(config.path)
        n = ckpt.shape.num_layers
        if stages is None:
            placement = LayerPlacement.single(device, n)
        elif isinstance(stages, LayerPlacement):
            placement = LayerPlacement.of(stages.stages, n)  # checked against this checkpoint's layer count
        else:
            placement = LayerPlacement.of(stages, n)
        dtype = TORCH_DTYPES[config.dtype]
        model_class = MODEL_CLASSES.get(ckpt.shape.architecture)
        if model_class is None:
            raise UnsupportedModelError(
                f"architecture {ckpt.shape.architecture!r} cannot run yet; supported: {', '.join(RUNNABLE)}"
            )
        model = model_class(ckpt.shape, dtype, placement.first, config.max_seq_len, placement)
        total = len(ckpt.tensors)
        devices = model.weight_devices()
        first = placement.first
        # Each tensor straight onto its layer's device; one the model has no place for (it is dropped) goes first.
        weights = iter_weights(ckpt, dtype, lambda name: devices.get(name, first))
        if progress is not None:
            weights = _counting(weights, lambda n: progress(n, total))
        model.load(weights, str(ckpt.path))
        tokens = kv_tokens if kv_tokens is not None else default_kv_tokens(config)
        spec = ModelSpec.from_shape(config, ckpt.shape)
        # Sliding-window layers get their own pool of max_batch windows, as the planner counts them.
        window_blocks = sliding_kv_blocks(spec, tokens, block_size)
        # A split model decodes eagerly: the decode runner (and its CUDA graphs) is single-device.
        graphs = uses_decode_graphs(spec, first.type == "cuda", split=placement.split)
        caches = [
            KVCache(
                ckpt.shape,
                blocks_for(tokens, block_size) + (1 if graphs else 0),  # + the decode runner's scratch block
                block_size,
                TORCH_DTYPES[config.kv_dtype_resolved],
                st.device,
                window_blocks,
                st.layers,  # this stage's layers only: memory/estimate.py stage_kv(start, end)
            )
            for st in placement.stages
        ]
        return cls(model, caches, config, eos_token_ids, decode_graphs=graphs)

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
        for field_name, ids in (
            ("logit_bias", [t for t, _ in params.logit_bias]),
            ("stop_token_ids", params.stop_token_ids),
        ):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise RequestError(f"{field_name}: token id {bad} is outside the vocabulary [0, {vocab})", field_name)
        seq_id = request_id or f"seq-{next(self._ids)}"
        if seq_id in self.seqs:
            raise RequestError(f"request id {seq_id!r} is already in use", "request_id")
        seq = Seq(
            id=seq_id,
            prompt_ids=prompt,
            params=params,
            generator=make_generator(params.seed, self.placement.last),  # sampling runs where the logits are
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

    def schedule(self, prefill_limit: int | None = None, decodes: bool = True, graph_prompts: bool = False) -> StepPlan:
        """The next step (scheduler.py). decodes=False: its prompt chunks only, which may run beside a decode-only
        step still in flight (prefill_limit 0): the host keeps a model's decode rows on their graph while its
        prompts run eager on another stream. graph_prompts, with a decode runner that has prompt rows
        (ModelConfig.graph_prompt_tokens): prompts with at most that many tokens left ride the decode steps as
        rows of its graph (a decode step takes them up to that many tokens, or ModelConfig.graph_prompt_chunk, in place
        of prefill_limit; a prompt-only step leaves them while the model decodes), and such a plan is `graphed`."""
        short = self.runner.prompt_tokens if graph_prompts and self.runner is not None else 0
        # A decode step carries at most graph_prompt_chunk of them (a longer one rides the next steps too).
        carry = min(short, self.config.graph_prompt_chunk or short)
        plan = self.scheduler.schedule(carry if short and decodes else prefill_limit, decodes, short)
        if not short or not decodes or not plan.prompt_tokens:
            return plan
        # The scheduler took only prompts that fit the rows and ask for no prompt logprobs, decode rows first: the
        # plan must ride the graph (as a mixed step its decode rows would share the runner's buffers with the
        # model's next decode step, which the host may launch beside a step with prompt tokens).
        assert self._fits_graph(plan), "a plan scheduled for the graph does not fit it"
        return dataclasses.replace(plan, graphed=True)

    def execute(self, plan: StepPlan, stream: torch.cuda.Stream | None = None) -> None:
        drain(self.launch_slices(plan, stream))

    def launch_slices(self, plan: StepPlan, stream: torch.cuda.Stream | None = None) -> Slices[None]:
        """execute(plan, stream) a layer at a time (slices.py): each slice queues more of the step's kernels on
        `stream`, the last its sampling; collect the step after the last. Between slices the caller may launch
        other models' steps, and this model's decode-only steps beside a prompt-only plan (a mixed plan's decode
        rows are the runner's static buffers: run its slices to the end before the model's next step)."""
        if plan.empty:
            return
        writers = [seq for c in plan.chunks if (seq := self.seqs.get(c.seq_id)) is not None]
        for seq in writers:
            seq.inflight += 1
        self._writers[id(plan)] = writers

        def on_stream() -> contextlib.AbstractContextManager[object]:
            stack = contextlib.ExitStack()
            stack.enter_context(self._on_device())
            if stream is not None:
                stack.enter_context(torch.cuda.stream(stream))
            return stack

        scores: list[PendingScores] = []
        logits = yield from each_in(self._forward_slices(plan, scores), on_stream)
        with on_stream():
            self._inflight[id(plan)] = self._launch_sample(plan, logits, scores)

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        """Launch the plan's forward pass: float32 logits of its sampled chunks, in order."""
        return drain(self._forward_slices(plan))

    def _forward_slices(self, plan: StepPlan, scores: list[PendingScores] | None = None) -> Slices[torch.Tensor]:
        """_forward a layer at a time (the runner's graph replay is one slice); prompt chunks of requests that
        asked for prompt logprobs score their tokens into `scores`."""
        decode = [c for c in plan.chunks if c.is_decode]
        if plan.graphed:  # short prompts ride in the graph as rows of their own (decode_runner.py)
            assert self.runner is not None
            return self.runner.run(self._decode_rows(decode) + self._graph_rows(plan))[: plan.num_sampled]
        # A prompt-only step may run beside a decode step on another stream: it never touches the runner's static
        # buffers (a prompt's one-token last chunk would look like a decode row).
        if self.runner is None or not decode or plan.prompt_only:
            return (yield from self._chunk_slices(plan.chunks, scores))
        rows = self._decode_rows(decode)
        if len(decode) == len(plan.chunks):  # a pure decode step replays a captured graph
            return self.runner.run(rows)
        # A mixed step: its decode rows still replay the graph and only the prompt chunks take the reference
        # path, so a prompt arriving beside running sequences does not turn their steps eager. The logits are
        # stitched back into the order of the plan's sampled chunks.
        prompts = [c for c in plan.chunks if not c.is_decode]
        sampled = [c for c in plan.chunks if c.sample]
        is_decode = [c.is_decode for c in sampled]
        dec = self.runner.run(rows)  # a view of the runner's static buffer: copied out below
        pre = yield from self._chunk_slices(prompts, scores)
        dev = dec.device
        # The plan's sampled rows in the order of cat([dec, pre]): decode rows first, then prompts, each in order.
        order = sorted(range(len(sampled)), key=lambda k: not is_decode[k])
        out = torch.empty(len(sampled), dec.shape[1], dtype=dec.dtype, device=dev)
        return out.index_copy_(0, to_device(torch.tensor(order), dev), torch.cat([dec, pre.to(dev, dec.dtype)]))

    def _decode_rows(self, decode: list[Chunk]) -> list[DecodeRow]:
        """The runner's rows of a plan's decode chunks: each its token, or the row of `sampled` holding it."""
        from llmhost.engine.decode_runner import DecodeRow

        return [
            DecodeRow(c.token_ids[0], c.start, c.block_table)
            if c.token_ids[0] != PENDING_TOKEN
            else DecodeRow(0, c.start, c.block_table, feed=self._feed_rows[c.seq_id])
            for c in decode
        ]

    def _fits_graph(self, plan: StepPlan) -> bool:
        """Whether a plan's prompt chunks can run as rows of the runner's graph: they fit its prompt rows, none asks
        for prompt logprobs (those take the reference path, which scores them), and its decode chunks sample before
        its prompt chunks (the rows that get logits are then in the order of the plan's sampled chunks). The
        scheduler's `short` rule makes every plan scheduled for the graph fit."""
        if self.runner is None or plan.prompt_tokens > self.runner.prompt_tokens:
            return False
        prompts = [c for c in plan.chunks if not c.is_decode]
        seqs = [self.seqs.get(c.seq_id) for c in prompts]
        if any(seq is not None and seq.params.prompt_logprobs is not None for seq in seqs):
            return False
        sampled = [c.seq_id for c in plan.chunks if c.sample]
        return sampled == [c.seq_id for c in plan.chunks if c.is_decode] + [c.seq_id for c in prompts if c.sample]

    def _graph_rows(self, plan: StepPlan) -> list[DecodeRow]:
        """A graphed plan's prompt chunks as rows of the runner's graph (_fits_graph): first the last token of each
        chunk that samples, in plan order (after the decode rows they get the next logits), then the chunks' other
        tokens."""
        from llmhost.engine.decode_runner import DecodeRow

        prompts = [c for c in plan.chunks if not c.is_decode]
        last = [DecodeRow(c.token_ids[-1], c.end - 1, c.block_table) for c in prompts if c.sample]
        rest = [
            DecodeRow(tok, c.start + i, c.block_table)
            for c in prompts
            for i, tok in enumerate(c.token_ids[: len(c.token_ids) - 1 if c.sample else None])
        ]
        return last + rest

    def _launch_sample(self, plan: StepPlan, logits: torch.Tensor, scores: list[PendingScores]) -> _Launched:
        """Queue the sampling of the step's tokens right behind its forward pass (the logits may be the runner's
        static buffer, which the next step overwrites), and leave them in the runner's `sampled` for a next step
        that runs ahead."""
        sampled = [self.seqs.get(c.seq_id) for c in plan.chunks if c.sample]
        live = [k for k, s in enumerate(sampled) if s is not None]
        alive = [s for s in sampled if s is not None]
        if not alive:
            return _Launched(alive, None, scores=scores)
        rows = logits if len(live) == len(sampled) else logits[live]
        pending = launch_sample(
            rows,
            [s.params for s in alive],
            [s.generator for s in alive],
            [s.prompt_ids for s in alive],
            [s.output_ids for s in alive],
            [self._banned(s) for s in alive] if any(s.params.min_tokens for s in alive) else None,
        )
        # A step with decode rows may be followed by one that runs ahead, which reads these tokens on the device. A
        # prompt-only step (beside a decode step in flight, on another stream) must leave them: its first tokens
        # are read on the host, like any step's that is not run ahead of.
        if self.runner is not None and not plan.prompt_only:
            self.runner.sampled[: len(alive)].copy_(pending.tokens)
            self._feed_rows = {s.id: k for k, s in enumerate(alive)}
        return _Launched(alive, pending, scores=scores)

    def _forward_chunks(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """The reference forward over `chunks` (any mix of prompt chunks and decode tokens): float32 logits of
        the chunks that sample, in order."""
        return drain(self._chunk_slices(chunks))

    def _chunk_slices(self, chunks: Sequence[Chunk], scores: list[PendingScores] | None = None) -> Slices[torch.Tensor]:
        """_forward_chunks a layer at a time; with `scores`, rows that score prompt tokens for requests that
        asked (prompt_scores.py) leave their logprobs there."""
        # The fused GPU forward attends over the whole step at once (kernels/varlen_attention.py) from the
        # contexts packed flat; the reference path loops over the chunks.
        windowed = self.cache.window is not None
        inputs = StepInputs(chunks, self.cache.block_size, windowed, flat=self.model.fused and not windowed)
        # The step's metadata reaches each device once (not once per stage or layer); stages on one device
        # share it.
        on: dict[torch.device, DeviceStep] = {dev: inputs.to(dev) for dev in self.placement.devices}
        stages = [
            StageInputs(on[st.device].positions, on[st.device].batch, cache)
            for st, cache in zip(self.placement.stages, self.caches, strict=True)
        ]
        asked = {
            c.seq_id: (seq.prompt_ids, k)
            for c in chunks
            if (seq := self.seqs.get(c.seq_id)) is not None and (k := seq.params.prompt_logprobs) is not None
        }
        scored = scored_rows(chunks, asked) if asked and scores is not None else None
        last = self.placement.last
        if scored is None:
            return (
                yield from self.model.forward_slices(on[self.placement.first].input_ids, stages, on[last].logits_rows)
            )
        sampled = on[last].logits_rows
        rows = torch.cat([sampled, to_device(torch.tensor(scored.rows, dtype=torch.int64), last)])
        hidden = yield from self.model.forward_slices(on[self.placement.first].input_ids, stages, rows, head=False)
        assert scores is not None
        scores.append(PendingScores(self.model.head, hidden[len(sampled) :], scored, self.model.shape.vocab_size))
        return self.model.head(hidden[: len(sampled)])

    def collect(self, plan: StepPlan) -> list[TokenOutput]:
        if plan.empty:
            return []
        launched = self._inflight.pop(id(plan))
        if not launched.advanced:
            self.scheduler.advance(plan)
        # Collected means done on the device (the host collects a step once its event fired; step() runs one
        # stream): blocks its sequences let go of meanwhile can be handed out now.
        self._done_writing(self._writers.pop(id(plan), []))
        for pending in launched.scores:
            for seq_id, position, score in pending.result():
                if (scored := self.seqs.get(seq_id)) is not None:
                    # By position: a preempted request's recomputed prompt scores the same tokens again.
                    scored.prompt_scores[position] = score
        if launched.sample is None:
            return []
        result = launched.sample.result()  # the one wait for the device
        for c in plan.chunks:
            # After that wait the step's K/V (and its sequences' earlier chunks', queued before it) are on the
            # device for any step launched later, on any stream: their full blocks may be shared. A step without
            # sampled rows is not waited for; its blocks are named when the sequence's sampling chunk is
            # collected. A sequence preempted since holds other blocks now (it is re-admitted two schedules
            # later at the earliest, after this collect).
            if (alive := self.seqs.get(c.seq_id)) is not None and alive.status is SeqStatus.RUNNING:
                self.blocks.register(alive, c.end)
        outputs = []
        for k, seq in enumerate(launched.seqs):
            if seq.pending:
                seq.pending -= 1  # its token is read now, whatever happened to the sequence meanwhile
            # A request aborted while its step ran gets nothing; the step's other rows are unaffected.
            if seq.id not in self.seqs:
                continue
            token = result.tokens[k]
            seq.output_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
                del self.seqs[seq.id]
            prompt_logprobs = None
            if seq.params.prompt_logprobs is not None and len(seq.output_ids) == 1:
                prompt_logprobs = [None, *(seq.prompt_scores[p] for p in range(1, len(seq.prompt_ids)))]
            outputs.append(
                TokenOutput(seq.id, token, result.logprobs[k], result.top_logprobs[k], reason, prompt_logprobs)
            )
        return outputs

    def forget_failed_launches(self) -> None:
        """After a launch raised (the host fails the engine's requests): steps whose launch never finished will
        never be collected, so their sequences' held-back blocks are returned here, once the device has run
        whatever of them was queued."""
        failed = [pid for pid in self._writers if pid not in self._inflight]
        if not failed:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for pid in failed:
            self._done_writing(self._writers.pop(pid))

    def _done_writing(self, writers: list[Seq]) -> None:
        """A step with chunks of `writers` is done on the device: blocks they let go of meanwhile come back."""
        for writer in writers:
            writer.inflight -= 1
            if not writer.inflight and (writer.held_blocks or writer.held_window_blocks):
                self.blocks.release_held(writer)

    def can_run_ahead(self, plan: StepPlan) -> bool:
        """Whether the step after `plan` may launch before plan's tokens are read: the decode runner feeds them on
        the device, and no sampled row needs plan's logits (logprobs) or its token on the host (penalties)."""
        if self.runner is None or plan.empty or plan.prompt_only:
            return False
        launched = self._inflight[id(plan)]
        return launched.sample is not None and all(
            s.params.logprobs is None and not s.params.uses_penalties for s in launched.seqs
        )

    def run_ahead(
        self,
        plan: StepPlan,
        stream: torch.cuda.Stream | None = None,
        prefill_limit: int | None = None,
        graph_prompts: bool = False,
    ) -> StepPlan | None:
        """Count plan's tokens as computed and its sampled tokens as pending, then schedule and launch the next
        step (on `stream`: plan's, so it runs after plan; `prefill_limit` and `graph_prompts` as in schedule);
        returns it, or None when there is nothing to run. Call after execute(plan), before collect(plan), when
        can_run_ahead(plan)."""
        launched = self._inflight[id(plan)]
        self.scheduler.advance(plan)
        launched.advanced = True
        for seq in launched.seqs:
            seq.pending += 1
        nxt = self.schedule(prefill_limit, graph_prompts=graph_prompts)
        if nxt.empty:
            return None
        self.execute(nxt, stream)
        return nxt

    def _banned(self, seq: Seq) -> tuple[int, ...]:
        """Token ids seq may not sample in the step being launched: its EOS and stop ids while it has fewer than
        min_tokens tokens (its pending one, read after this step launched, counts)."""
        p = seq.params
        if len(seq.output_ids) + seq.pending >= p.min_tokens:
            return ()
        return p.stop_token_ids + (() if p.ignore_eos else tuple(self.eos_token_ids))

    def _finish_reason(self, seq: Seq, token: int) -> FinishReason | None:
        if token in seq.params.stop_token_ids or (token in self.eos_token_ids and not seq.params.ignore_eos):
            return "stop"
        if len(seq.output_ids) >= seq.max_new_tokens:
            return "length"
        return None

    def step(self) -> list[TokenOutput]:
        """Outputs of one step. With a decode runner the next step is already launched when this returns."""
        plan, self._ahead = self._ahead, None
        if plan is None:
            plan = self.schedule()
            self.execute(plan)
        if self.can_run_ahead(plan):
            self._ahead = self.run_ahead(plan)
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
        scores: dict[str, list[PromptLogprob | None]] = {}
        while len(reasons) < len(ids):
            for out in self.step():
                if out.seq_id in tokens:
                    tokens[out.seq_id].append(out.token)
                    logprobs[out.seq_id].append(out.logprob)
                    if out.prompt_logprobs is not None:
                        scores[out.seq_id] = out.prompt_logprobs
                    if out.finish_reason is not None:
                        reasons[out.seq_id] = out.finish_reason
        return [
            Completion(i, list(p), tokens[i], reasons[i], logprobs[i], scores.get(i))
            for i, p in zip(ids, prompts, strict=True)
        ]

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
        """This engine's bytes; a split model's summed over its devices (memory_by_device has each)."""
        reports = list(self.memory_by_device().values())
        if len(reports) == 1:
            return reports[0]
        used = [r.driver_used for r in reports]
        return MemoryReport(
            ",".join(r.device for r in reports),
            sum(r.weights for r in reports),
            sum(r.kv for r in reports),
            sum(r.workspace for r in reports),
            sum(r.graphs for r in reports),
            None if any(u is None for u in used) else sum(u for u in used if u is not None),
        )

    def memory_by_device(self) -> dict[str, MemoryReport]:
        """Per device this engine uses (str(device) -> report): weights and KV exactly, from the tensors held
        there; on a GPU, workspace is the caching allocator's peak there beyond those (and the graphs)."""
        weights: dict[torch.device, int] = {}
        kv: dict[torch.device, int] = {}
        for k, cache in enumerate(self.caches):
            dev = self.placement.stages[k].device
            weights[dev] = weights.get(dev, 0) + sum(t.numel() * t.element_size() for t in self.model.stage_tensors(k))
            kv[dev] = kv.get(dev, 0) + cache.nbytes
        out: dict[str, MemoryReport] = {}
        for dev in self.placement.devices:
            w, c = weights[dev], kv[dev]
            if dev.type != "cuda":
                out[str(dev)] = MemoryReport(str(dev), w, c, 0, 0, None)
                continue
            # The caching allocator's peak covers weights, KV, the runner's static buffers and graph pool, and the
            # largest eager step; graphs counts the runner's static buffers, workspace the rest.
            peak = torch.cuda.max_memory_reserved(dev)
            graphs = self.runner.static_bytes if self.runner is not None else 0  # never on a split model
            free, total = torch.cuda.mem_get_info(dev)
            out[str(dev)] = MemoryReport(str(dev), w, c, max(0, peak - w - c - graphs), graphs, total - free)
        return out


def _check_caches(placement: LayerPlacement, caches: Sequence[KVCache]) -> None:
    """One cache per stage, holding that stage's layers on its device, all of one geometry (a caller's bug
    otherwise, not the user's)."""
    if len(caches) != len(placement.stages):
        raise ValueError(f"{len(caches)} KV caches for a model of {len(placement.stages)} stages")
    geometry = {(c.num_blocks, c.block_size, c.window, c.window_blocks) for c in caches}
    if len(geometry) != 1:
        raise ValueError(f"the stages' KV caches differ in blocks or window: {sorted(geometry, key=str)}")
    for k, (st, c) in enumerate(zip(placement.stages, caches, strict=True)):
        if c.layers != st.layers or _resolved(c.device) != _resolved(st.device):
            raise ValueError(
                f"stage {k} runs layers [{st.start}, {st.end}) on {st.device} but its KV cache holds "
                f"[{c.layers.start}, {c.layers.stop}) on {c.device}"
            )


def _resolved(device: torch.device) -> torch.device:
    """'cuda' as the index it means now ('cuda:0'), so two spellings of one device compare equal."""
    return torch.empty(0, device=device).device


def _counting(
    items: Iterator[tuple[str, torch.Tensor]], report: Callable[[int], None]
) -> Iterator[tuple[str, torch.Tensor]]:
    for n, item in enumerate(items, 1):
        yield item
        report(n)
