"""What one model needs on one GPU, term by term: weights, KV cache, workspace, CUDA-graph pools.

The engine is held to these assumptions (DESIGN.md "Memory model"); each is stated where it is used:
- weights are stored in the configured dtype, norms included; a GGUF is dequantized to it at load;
- the KV cache is one paged pool per layer of `blocks x block_size x 2 x kv_heads x head_dim` in the KV dtype;
- one step processes at most `step_tokens = max(prefill_chunk, max_batch)` tokens (decodes count against it);
- logits are computed in float32 only for rows that sample (at most max_batch), never for every prompt token;
- CUDA graphs are captured for the decode batch sizes in `graph_batch_sizes(max_batch)`, and with
  `prompt_rows` (ModelConfig) for that many prompt rows more (`graph_step_sizes`), largest first, sharing one memory
  pool, so the pool holds the activations of the largest captured step; a split model has none;
- a split model holds on each stage its layers' weights and KV pool (the same block count on every stage), the
  embedding on the first stage, the final norm and head on the last (a tied head copied there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmhost.config import DTYPE_BYTES, ModelConfig
from llmhost.memory.history import model_fingerprint
from llmhost.model_files.checkpoint import Checkpoint
from llmhost.model_files.shape import ModelShape

FP32 = 4  # bytes: logits and sampling buffers are float32
# The caching allocator rounds large blocks to 2 MiB and keeps a few of each size it has seen.
ALLOCATOR_SLACK_BYTES = 64 * 1024**2
GRAPH_EXEC_BYTES = 2 * 1024**2  # device memory one instantiated CUDA graph keeps (kernel params, launch state)
# [host] sm_steering captures a model's decode graphs of up to STEERED_MAX_ROWS rows once more for each of
# STEERED_SETS SM counts (host/sm_steering.py FRACTIONS, host/gpu_scheduler.py CONCURRENT_MAX_ROWS; a test holds
# them equal), into the graphs' shared pool: only their executables add memory. The LLMHOST_SM_DEEPER experiment's two
# sets more are not counted (up to 32 MiB a model).
STEERED_SETS = 6
STEERED_MAX_ROWS = 8


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def graph_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Decode batch sizes captured as CUDA graphs; a batch is padded up to the next captured size."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return (*sizes, max_batch)


def graph_step_sizes(max_batch: int, prompt_tokens: int = 0) -> tuple[int, ...]:
    """Every row count captured as a CUDA graph: the decode batch sizes, then (prompt_tokens > 0) a full batch
    with 16, 32, 64, ... prompt rows beside it up to prompt_tokens (engine/decode_runner.py runs a short prompt's
    tokens as rows of the decode step)."""
    extra = [p for p in (16 << k for k in range(16)) if p < prompt_tokens] + ([prompt_tokens] if prompt_tokens else [])
    return graph_batch_sizes(max_batch) + tuple(max_batch + p for p in extra)


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs to know of one configured model: its config and its checkpoint's numbers."""

    config: ModelConfig
    shape: ModelShape
    layer_params: tuple[int, ...]  # per decoder layer, from tensor headers (or the analytic count)
    embed_params: int
    head_params: int  # final norm + untied LM head; tied heads reuse the embedding
    other_params: int = 0  # tensors that belong to no layer or end (e.g. rope_freqs); placed with the head
    fingerprint: str | None = None  # the checkpoint's (memory/history.py); None: a bare shape, never in the history

    @classmethod
    def from_checkpoint(cls, config: ModelConfig, ckpt: Checkpoint) -> ModelSpec:
        parts = ckpt.params_by_part()
        layers = tuple(parts.get(i, 0) for i in range(ckpt.shape.num_layers))
        return cls(
            config,
            ckpt.shape,
            layers,
            parts.get("embed", 0),
            parts.get("head", 0),
            parts.get("other", 0),
            fingerprint=model_fingerprint(ckpt),
        )

    @classmethod
    def from_shape(cls, config: ModelConfig, shape: ModelShape) -> ModelSpec:
        return cls(
            config,
            shape,
            (shape.layer_params(),) * shape.num_layers,
            shape.embed_params(),
            shape.head_params(),
        )

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.config.dtype]

    @property
    def kv_dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.config.kv_dtype_resolved]

    @property
    def weight_bytes(self) -> int:
        params = sum(self.layer_params) + self.embed_params + self.head_params + self.other_params
        return params * self.dtype_bytes


MeasuredTerm = Literal["workspace", "graphs"]  # the terms a plan may take from the measured history


@dataclass(frozen=True)
class StageNeed:
    """One model's bytes on one device: the whole model, or one stage of a split."""

    weights: int
    kv: int
    workspace: int
    graphs: int
    # Terms taken from the measured history instead of the estimate (in term order), and when they were measured
    # (Unix seconds); empty and None for a pure estimate.
    measured: tuple[MeasuredTerm, ...] = ()
    measured_at: float | None = None

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.workspace + self.graphs


def stage_weights(spec: ModelSpec, start: int, end: int, first: bool, last: bool) -> int:
    """Weights of layers [start, end) plus the ends this stage holds."""
    params = sum(spec.layer_params[start:end])
    if first:
        params += spec.embed_params
    if last:
        params += spec.head_params + spec.other_params
        if spec.shape.tie_embeddings and not first:
            params += spec.embed_params  # a tied LM head on another GPU needs its own copy of the embedding
    return params * spec.dtype_bytes


def kv_blocks(kv_tokens: int, block_size: int) -> int:
    return ceil_div(kv_tokens, block_size)


def sliding_kv_blocks(spec: ModelSpec, kv_tokens: int, block_size: int) -> int:
    """A sliding layer keeps at most the window per sequence: ceil(window / block) blocks, plus one because the
    window straddles a block boundary; never more than the full pool."""
    window = spec.shape.sliding_window or 0
    per_seq = ceil_div(window, block_size) + 1
    return min(kv_blocks(kv_tokens, block_size), spec.config.max_batch * per_seq)


def stage_kv(spec: ModelSpec, kv_tokens: int, block_size: int, start: int, end: int) -> int:
    """KV bytes of layers [start, end): whole blocks of `block_size` tokens; sliding layers capped."""
    per_token_layer = spec.shape.kv_bytes_per_token_layer(spec.kv_dtype_bytes)  # K and V
    full = kv_blocks(kv_tokens, block_size)
    sliding = sliding_kv_blocks(spec, kv_tokens, block_size) if spec.shape.sliding_window else full
    total = 0
    for i in range(start, end):
        blocks = sliding if spec.shape.layer_kind(i) == "sliding" else full
        total += blocks * block_size * per_token_layer
    return total


def step_tokens(config: ModelConfig) -> int:
    return max(config.prefill_chunk, config.max_batch)


def activation_bytes(spec: ModelSpec, tokens: int, context: int, last: bool) -> int:
    """Peak activation bytes of one forward step over `tokens` tokens that attend to up to `context` cached
    tokens. Peak = what lives across a layer + the larger of the attention and MLP phases (+ logits on the last
    stage); buffers of one phase are freed before the next."""
    s = spec.shape
    b = spec.dtype_bytes
    residual = 2 * tokens * s.hidden_size * b  # the residual stream and its normed copy
    norm = 2 * tokens * s.hidden_size * FP32  # RMSNorm works in float32: the upcast and its square
    qkv = tokens * (s.num_heads + 2 * s.num_kv_heads) * s.head_dim * b  # fused q, k, v projection output
    q_size = tokens * s.num_heads * s.head_dim * b
    rope = 2 * q_size  # rotated q (and k) and the rotate-half temporary
    attn_out = q_size  # attention output before o_proj
    # Attention reads one layer's cached K and V for the chunk's context: gathered (kv_heads), then expanded to
    # every query head so the fused kernel applies (engine/attention.py).
    context_kv = context * 2 * (s.num_kv_heads + s.num_heads) * s.head_dim * spec.kv_dtype_bytes
    attention = qkv + rope + attn_out + context_kv
    mlp = tokens * 4 * s.intermediate_size * b  # gate|up output, silu(gate), and silu(gate) * up
    phases = max(attention, mlp, norm)
    logits = 0
    if last:
        rows = min(tokens, spec.config.max_batch)  # only rows that sample get logits
        # logits, penalised scores, probabilities, exponential noise and their ratio: float32 [rows, vocab] each
        logits = rows * s.vocab_size * FP32 * 5
    return residual + max(phases, logits)


def stage_workspace(spec: ModelSpec, last: bool) -> int:
    """The largest step: a full prefill chunk attending to max_seq_len cached tokens, rounded up for the caching
    allocator, which keeps freed blocks for reuse (and with varying sizes, a few more than the peak needs)."""
    peak = activation_bytes(spec, step_tokens(spec.config), spec.config.max_seq_len, last)
    return peak + ALLOCATOR_SLACK_BYTES


DECODE_PARTITION = 256  # context tokens per decode-attention program (engine/kernels/paged_decode.py PARTITION)


def uses_decode_graphs(spec: ModelSpec, on_gpu: bool, split: bool = False) -> bool:
    """The engine captures decode graphs for Llama-family models without sliding windows on one GPU; a model
    split across devices decodes eagerly (the decode runner is single-device)."""
    return (
        on_gpu
        and not split
        and spec.config.cuda_graphs
        and spec.shape.architecture != "gemma3"
        and not spec.shape.sliding_window
    )


def steered_graphs(spec: ModelSpec, on_gpu: bool, split: bool = False) -> int:
    """The executables of the decode graphs [host] sm_steering captures beside the whole GPU's (STEERED_SETS)."""
    if not uses_decode_graphs(spec, on_gpu, split):
        return 0
    small = sum(1 for b in graph_batch_sizes(spec.config.max_batch) if b <= STEERED_MAX_ROWS)
    return STEERED_SETS * small * GRAPH_EXEC_BYTES


def stage_graphs(
    spec: ModelSpec, last: bool, on_gpu: bool, block_size: int = 16, split: bool = False, steered: bool = False
) -> int:
    """What the decode runner (engine/decode_runner.py) allocates: static inputs, activations and the attention
    workspace for its rows (max_batch, plus ModelConfig.prompt_rows), float32 logits for max_batch rows (only rows that
    sample get them), one scratch KV block for padded rows, and the graphs' shared pool, which holds the largest
    captured step's transient GEMM outputs; each captured graph adds its executable's own memory, and
    with [host] sm_steering (`steered`) so do its confined copies (steered_graphs). Nothing for a stage of a split
    model (split: the stage is not the whole model)."""
    if not uses_decode_graphs(spec, on_gpu, split):
        return 0
    s = spec.shape
    b = spec.dtype_bytes
    sizes = graph_step_sizes(spec.config.max_batch, spec.config.prompt_rows)
    mb = max(sizes)  # rows
    lb = spec.config.max_batch  # rows with logits
    max_blocks = ceil_div(spec.config.max_seq_len, block_size)  # block-table columns
    parts = ceil_div(spec.config.max_seq_len, DECODE_PARTITION)
    q_dim = s.num_heads * s.head_dim
    qkv_dim = q_dim + 2 * s.num_kv_heads * s.head_dim
    # sampled tokens (int64, max_batch), and per row: token, source, position, slot, length (int64), block table
    inputs = lb * 8 + mb * 5 * 8 + mb * max_blocks * 4
    activations = mb * (2 * s.hidden_size + qkv_dim + q_dim + s.intermediate_size) * b  # h, x, qkv, attn, act
    logits = lb * s.vocab_size * FP32 if last else 0
    workspace = mb * s.num_heads * parts * (2 + s.head_dim) * FP32  # per-partition max, sum and accumulator
    scratch = block_size * s.kv_bytes_per_token(spec.kv_dtype_bytes)  # one block of every layer's K and V
    pool = mb * (2 * s.hidden_size + 2 * s.intermediate_size) * b  # o_proj, down, gate|up outputs
    if last:
        pool += lb * s.vocab_size * b  # the LM head's output before its float32 copy
    n_graphs = len(sizes)
    confined = steered_graphs(spec, on_gpu, split) if steered else 0
    return inputs + activations + logits + workspace + scratch + pool + n_graphs * GRAPH_EXEC_BYTES + confined


def default_kv_tokens(config: ModelConfig) -> int:
    return config.max_seq_len * config.max_batch


def stage_need(
    spec: ModelSpec, kv_tokens: int, block_size: int, start: int, end: int, on_gpu: bool = True, steered: bool = False
) -> StageNeed:
    first = start == 0
    last = end == spec.shape.num_layers
    return StageNeed(
        weights=stage_weights(spec, start, end, first, last),
        kv=stage_kv(spec, kv_tokens, block_size, start, end),
        workspace=stage_workspace(spec, last),
        graphs=stage_graphs(spec, last, on_gpu, block_size, split=not (first and last), steered=steered),
    )


def whole_need(spec: ModelSpec, kv_tokens: int, block_size: int, on_gpu: bool = True) -> StageNeed:
    return stage_need(spec, kv_tokens, block_size, 0, spec.shape.num_layers, on_gpu)
