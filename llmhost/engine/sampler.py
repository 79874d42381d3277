"""Token sampler: one token per row of a logits batch, each row with its own SamplingParams and generator.

Invariant: a row's token depends only on its own logits, params, generator state and token history, never on which
other rows share the batch, so a seeded request gives the same output alone or batched. Every stage below is
per-row arithmetic whose neutral settings (penalty 1, top_k 0, top_p 1, min_p 0) leave a row's values bit-identical,
and each sampled row draws exactly V random numbers from its own generator per step; greedy rows draw none.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import cast

import numpy as np
import torch

from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.step_inputs import to_device

_SEED_SPACE = 2**64  # torch.Generator.manual_seed accepts seeds in [0, 2**64) only
_MASS_SCALE = 2.0**40  # fixed-point unit for top_p mass; a whole row sums to about 2**40, far below int64's 2**63


@dataclass(frozen=True)
class SampleOutput:
    tokens: list[int]  # one sampled token per row
    # log_softmax of the raw logits (no penalties, no temperature, like vLLM's default) at the sampled token;
    # None where the row did not ask for logprobs
    logprobs: list[float | None]
    # the k most likely (token, raw logprob) pairs, descending, for a row with logprobs=k; None where not asked
    top_logprobs: list[list[tuple[int, float]] | None]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded from `seed`, or from fresh OS entropy when None (unseeded requests must not
    share a stream, or two of them sent together would return the same text)."""
    generator = torch.Generator(device=device)
    # OpenAI seeds are any integer; folding them into torch's range keeps every seed valid and still reproducible.
    generator.manual_seed(secrets.randbits(63) if seed is None else seed % _SEED_SPACE)
    return generator


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    banned: Sequence[Sequence[int]] | None = None,
) -> SampleOutput:
    """Sample one token per row. logits: [R, V], any float dtype, on the generators' device."""
    return launch_sample(logits, params, generators, prompt_ids, output_ids, banned).result()


def launch_sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    banned: Sequence[Sequence[int]] | None = None,
) -> PendingSample:
    """Queue the sampling of one token per row on the logits' device and the copy of its results to the host;
    nothing waits for the device. `PendingSample.tokens` holds the tokens on the device at once (the engine feeds
    them to the next step); `.result()` waits for the copy. banned: per row, token ids it may not sample now
    (min_tokens' EOS and stop ids; the engine knows them)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    rows = logits.shape[0]
    if not len(params) == len(generators) == len(prompt_ids) == len(output_ids) == rows:
        raise ValueError(
            f"{rows} logit rows but {len(params)} params, {len(generators)} generators, "
            f"{len(prompt_ids)} prompts, {len(output_ids)} outputs"
        )
    raw = logits.float()  # [R, V]
    sampled_rows = [r for r, p in enumerate(params) if not p.greedy]
    if not any(p.reads_settings for p in params) and not (banned and any(banned)):
        # Greedy rows without penalties or biases read no per-row settings: building and copying them was a third of a
        # graph-replayed decode step's launch on the host (bench/probes/host_profile.py).
        return _pack(raw, raw.argmax(dim=-1), params)
    settings = _row_settings(params, logits.device)

    scores = _biased(_penalize(raw, params, settings, prompt_ids, output_ids), params)
    if banned is not None and any(banned):
        ids = _flat_ids(list(enumerate(banned)), scores.shape[1])
        # Out of place: scores may be the logits themselves (the runner's static buffer, and logprobs' source).
        scores = scores.reshape(-1).index_fill(0, to_device(ids, scores.device), -torch.inf).view(scores.shape)
    tokens = scores.argmax(dim=-1)  # [R]; greedy rows keep this, ties go to the lowest id
    if sampled_rows:
        probs = _filtered_probs(scores, params, settings)
        # Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p (unnormalized is fine), and unlike
        # torch.multinomial it needs no host sync. One draw per row from that row's own generator keeps rows
        # independent of the batch.
        noise = torch.ones_like(probs)
        for r in sampled_rows:
            noise[r].exponential_(generator=generators[r])
        # An exact 0 draw would give p / 0 = nan for filtered tokens, and argmax ranks nan highest.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        drawn = (probs / noise).argmax(dim=-1)
        tokens = torch.where(settings.greedy, tokens, drawn)

    return _pack(raw, tokens, params)


@dataclass(frozen=True)
class _RowSettings:
    """Per-row sampling values as device columns [R, 1] (greedy: [R]), built with one host-to-device copy."""

    temperature: torch.Tensor
    top_k: torch.Tensor  # float; 0 disables
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor
    greedy: torch.Tensor  # bool [R]


def _row_settings(params: Sequence[SamplingParams], device: torch.device) -> _RowSettings:
    table = torch.tensor(
        [
            [
                1.0 if p.greedy else p.temperature,  # greedy rows never use their tempered scores
                float(p.top_k),  # exact in float32 for any vocabulary below 2**24
                p.top_p,
                p.min_p,
                p.repetition_penalty,
                p.frequency_penalty,
                p.presence_penalty,
                float(p.greedy),
            ]
            for p in params
        ],
        dtype=torch.float32,
    )
    # From pinned memory the copy is queued like any kernel; from pageable memory the driver may wait for the
    # stream first, which would stall an engine launching its next step before this one finished.
    table = to_device(table, device)
    columns = table.unbind(dim=1)
    return _RowSettings(
        temperature=columns[0][:, None],
        top_k=columns[1][:, None],
        top_p=columns[2][:, None],
        min_p=columns[3][:, None],
        repetition=columns[4][:, None],
        frequency=columns[5][:, None],
        presence=columns[6][:, None],
        greedy=columns[7] > 0.5,
    )


def _penalize(
    raw: torch.Tensor,
    params: Sequence[SamplingParams],
    settings: _RowSettings,
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Repetition penalty (HF: prompt and output tokens), then frequency and presence (OpenAI: output tokens)."""
    rows, vocab = raw.shape
    scores = raw
    repeat_rows = [r for r, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repeat_rows:
        seen_ids = _flat_ids([(r, seq) for r in repeat_rows for seq in (prompt_ids[r], output_ids[r])], vocab)
        seen = torch.zeros(rows * vocab, dtype=torch.bool, device=raw.device)
        seen.index_fill_(0, seen_ids.to(raw.device, non_blocking=True), True)
        penalty = settings.repetition
        # HF divides positive logits and multiplies the rest, so the penalty always lowers a seen token.
        penalized = torch.where(scores > 0, scores / penalty, scores * penalty)
        scores = torch.where(seen.view(rows, vocab), penalized, scores)
    count_rows = [r for r, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if count_rows:
        out_ids = _flat_ids([(r, output_ids[r]) for r in count_rows], vocab).to(raw.device, non_blocking=True)
        counts = torch.zeros(rows * vocab, dtype=torch.float32, device=raw.device)
        # Adding ones is exact in float32 below 2**24, so the order index_add_ applies them in does not matter.
        counts.index_add_(0, out_ids, torch.ones_like(out_ids, dtype=torch.float32))
        counts = counts.view(rows, vocab)
        scores = scores - counts * settings.frequency - (counts > 0).float() * settings.presence
    return scores


def _biased(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """scores plus each row's logit_bias (after the penalties, before temperature and the filters, as OpenAI and
    vLLM apply it). Rows without a bias add exact zeros, which leaves their scores' values unchanged."""
    biased = [(r, p.logit_bias) for r, p in enumerate(params) if p.logit_bias]
    if not biased:
        return scores
    rows, vocab = scores.shape
    ids = _flat_ids([(r, [token for token, _ in bias]) for r, bias in biased], vocab)
    values = torch.tensor([value for _, bias in biased for _, value in bias], dtype=torch.float32)
    # One pinned copy each, queued like a kernel (see _row_settings); ids are unique (validate), so put is exact.
    dense = torch.zeros(rows * vocab, dtype=torch.float32, device=scores.device)
    dense.index_put_((to_device(ids, scores.device),), to_device(values, scores.device))
    return scores + dense.view(rows, vocab)


def _flat_ids(row_sequences: Sequence[tuple[int, Sequence[int]]], vocab: int) -> torch.Tensor:
    """Token ids offset into a flattened [R * V] view. Built on the host with numpy: converting every history each
    step is the penalties' main cost, and np.fromiter is about 4x faster than torch.tensor on Python lists."""
    lengths = [len(seq) for _, seq in row_sequences]
    ids = np.fromiter(chain.from_iterable(seq for _, seq in row_sequences), dtype=np.int64, count=sum(lengths))
    ids += np.repeat(np.array([row for row, _ in row_sequences], dtype=np.int64) * vocab, lengths)
    return torch.from_numpy(ids)


def _filtered_probs(scores: torch.Tensor, params: Sequence[SamplingParams], settings: _RowSettings) -> torch.Tensor:
    """Temperature, top_k, top_p, min_p; returns [R, V] probabilities with filtered tokens at 0, not renormalized
    (the exponential race is scale-invariant per row)."""
    vocab = scores.shape[1]
    # Shifting by the row max first keeps a tiny temperature from overflowing to inf (inf - inf = nan in softmax).
    tempered = (scores - scores.amax(dim=-1, keepdim=True)) / settings.temperature
    use_top_k = any(0 < p.top_k < vocab for p in params)
    use_top_p = any(p.top_p < 1.0 for p in params)
    order: torch.Tensor | None = None
    if use_top_k or use_top_p:
        # Stable, so tied tokens straddling the top_p cut are ordered by id, not by whatever else is in the batch.
        ordered, order = torch.sort(tempered, dim=-1, descending=True, stable=True)
        if use_top_k:
            k = settings.top_k.clamp(min=1, max=vocab).long()
            kth = ordered.gather(-1, k - 1)
            # Threshold rather than position, as HF does: tokens tied with the k-th survive.
            active = (settings.top_k > 0) & (settings.top_k < vocab)
            kth = torch.where(active, kth, torch.full_like(kth, -torch.inf))
            tempered = tempered.masked_fill(tempered < kth, -torch.inf)
    # Softmax in vocabulary order for every row, so a row's probabilities do not depend on whether the batch sorted.
    probs = torch.softmax(tempered, dim=-1)
    if use_top_p:
        assert order is not None
        # Probabilities follow the logits' order (exp is monotone), so the logit sort also sorts them.
        ordered_probs = probs.gather(-1, order)
        # The running mass is summed in fixed point because integer addition is exact in any order: a float cumsum
        # on CUDA sums one row in a different order than a batch of rows (measured on the H100), which moved the
        # top_p cut. Scaling by a power of two is exact in float32; truncation loses < V x 2**-40 of mass.
        fixed = (ordered_probs * _MASS_SCALE).long()
        mass_before = fixed.cumsum(dim=-1) - fixed
        # At least 1: a top_p under 2**-40 truncated to 0 and dropped the top token too (a row of all zeros).
        limit = (settings.top_p * _MASS_SCALE).long().clamp(min=1)
        # Keep a token while the mass above it is < top_p: the smallest set reaching top_p, always the top token.
        # Rows with top_p = 1 are exempt, so a filter meant for other rows never trims their tail.
        drop_ordered = (mass_before >= limit) & (settings.top_p < 1.0)
        drop = torch.zeros_like(drop_ordered).scatter_(-1, order, drop_ordered)
        probs = probs.masked_fill(drop, 0.0)
    if any(p.min_p > 0.0 for p in params):
        # The top token survives every filter and renormalizing scales both sides, so this max is the final max.
        floor = settings.min_p * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs


class PendingSample:
    """Sampled tokens (and logprobs where asked) on their way to the host: one packed device tensor, copied with
    one asynchronous copy into pinned memory; `result()` is the sampler's one sync."""

    def __init__(self, tokens: torch.Tensor, packed: torch.Tensor, params: Sequence[SamplingParams], most: int):
        self.tokens = tokens  # [R] int64 on the device
        self.params = list(params)
        self.most = most
        if packed.device.type == "cuda":
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._done: torch.cuda.Event | None = torch.cuda.Event()  # type: ignore[no-untyped-call]
            # On the stream the copy ran on: the logits' device's, which for a split model is not the current
            # device (an event on the current one would not cover the copy, and the host would read the pinned
            # buffer early: garbage token ids, seen on 2x H200 as an out-of-bounds embedding gather).
            self._done.record(torch.cuda.current_stream(packed.device))
        else:
            self._host, self._done = packed, None

    def result(self) -> SampleOutput:
        if self._done is not None:
            self._done.synchronize()
        if self._host.dtype == torch.int64:  # tokens only
            return SampleOutput(
                cast(list[int], self._host.tolist()), [None] * len(self.params), [None] * len(self.params)
            )
        packed = cast(list[list[float]], self._host.tolist())  # [R, 2 + 2 * most]
        most = self.most
        out_logprobs: list[float | None] = []
        out_top: list[list[tuple[int, float]] | None] = []
        for p, row in zip(self.params, packed, strict=True):
            if p.logprobs is None:
                out_logprobs.append(None)
                out_top.append(None)
            else:
                k = min(p.logprobs, most)
                out_logprobs.append(row[1])
                out_top.append([(int(t), v) for t, v in zip(row[2 : 2 + k], row[2 + most : 2 + most + k], strict=True)])
        return SampleOutput([int(row[0]) for row in packed], out_logprobs, out_top)


def _pack(raw: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]) -> PendingSample:
    """Tokens, and logprobs where asked, packed into one tensor for one copy to the host."""
    if all(p.logprobs is None for p in params):
        return PendingSample(tokens, tokens, params, 0)
    logprobs = torch.log_softmax(raw, dim=-1)  # [R, V]
    chosen = logprobs.gather(-1, tokens[:, None])  # [R, 1]
    # A stable sort rather than topk: topk orders tied values (common in bf16 logits) differently for different k
    # and batch sizes on CUDA (measured on the H100), and each row keeps a prefix of the batch's largest k.
    most = min(max(p.logprobs or 0 for p in params), raw.shape[1])
    columns = [tokens[:, None].double(), chosen.double()]
    if most:
        top_values, top_ids = torch.sort(logprobs, dim=-1, descending=True, stable=True)
        columns += [top_ids[:, :most].double(), top_values[:, :most].double()]  # descending, ties by token id
    # float64 holds every token id and float32 logprob exactly, so one packed copy replaces four.
    return PendingSample(tokens, torch.cat(columns, dim=1), params, most)
