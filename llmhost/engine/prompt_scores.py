"""Prompt logprobs: how likely the model found each prompt token given the tokens before it (what OpenAI's legacy
`echo` + `logprobs` returns, and what evaluation harnesses score answers with).

A prompt chunk's hidden state at position p predicts the token at p + 1, so the rows of a chunk score the prompt
tokens after them; the last prompt position predicts the first output token and is the sampler's. Only sequences
that ask (SamplingParams.prompt_logprobs) get scored rows, and their head runs in pieces of at most PIECE_BYTES:
the logits of a whole chunk would be chunk x vocab floats (2048 x 128k x 4 B = 1 GiB on a GPU, beyond the plan);
a piece's logits, log_softmax and sort (BYTES_PER_LOGIT per vocabulary entry) stay within the plan's reserve.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from llmhost.engine.step_inputs import to_device

PIECE_BYTES = 64 * 2**20
BYTES_PER_LOGIT = 20  # float32 logits and log_softmax, the sort's float32 values and int64 ids


def piece_rows(vocab: int) -> int:
    """Rows of one piece: 26 for a 128k vocabulary, 68 for 49k."""
    return max(1, PIECE_BYTES // (BYTES_PER_LOGIT * vocab))


# One prompt token's score: its logprob and the k most likely tokens at its position, (token, logprob) descending.
PromptLogprob = tuple[float, list[tuple[int, float]]]


class _Chunk(Protocol):
    @property
    def seq_id(self) -> str: ...
    @property
    def start(self) -> int: ...
    @property
    def token_ids(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class ScoredRows:
    """Which rows of a step score which prompt tokens (host lists, in step-row order)."""

    rows: list[int]  # row of the step's flat token list
    targets: list[int]  # the prompt token that row predicts
    where: list[tuple[str, int]]  # (sequence id, the target's position in its prompt)
    top: list[int]  # how many top tokens that row's sequence asks for


def scored_rows(chunks: Sequence[_Chunk], prompts: Mapping[str, tuple[list[int], int]]) -> ScoredRows | None:
    """The rows of `chunks` (laid out one after another, as StepInputs packs them) that score a prompt token;
    prompts: sequence id -> (its prompt ids, top k) for the sequences that ask. None when no row scores."""
    out = ScoredRows([], [], [], [])
    row = 0
    for c in chunks:
        asked = prompts.get(c.seq_id)
        if asked is not None:
            prompt, k = asked
            # Position p scores the prompt token at p + 1; positions of output tokens (a preempted sequence's
            # recompute) and the prompt's last position (it samples) score nothing.
            for p in range(c.start, min(c.start + len(c.token_ids), len(prompt) - 1)):
                out.rows.append(row + p - c.start)
                out.targets.append(prompt[p + 1])
                out.where.append((c.seq_id, p + 1))
                out.top.append(k)
        row += len(c.token_ids)
    return out if out.rows else None


class PendingScores:
    """Scored rows' logprobs on the device until `result()` reads them (the step's collect, which waits for the
    device anyway)."""

    def __init__(
        self, head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, scored: ScoredRows, vocab: int
    ):
        """head: hidden [n, hidden] -> float32 logits [n, vocab]; hidden: the scored rows' hidden states."""
        self.scored = scored
        targets = to_device(torch.tensor(scored.targets, dtype=torch.int64), hidden.device)
        most = max(scored.top)
        chosen, top_ids, top_values = [], [], []
        step = piece_rows(vocab)
        for start in range(0, hidden.shape[0], step):
            logprobs = torch.log_softmax(head(hidden[start : start + step]), dim=-1)
            chosen.append(logprobs.gather(-1, targets[start : start + step, None])[:, 0])
            if most:
                # Stable, as the sampler's top logprobs: tied values ordered by token id, whatever k or batch.
                values, ids = torch.sort(logprobs, dim=-1, descending=True, stable=True)
                top_ids.append(ids[:, :most])
                top_values.append(values[:, :most])
        self._chosen = torch.cat(chosen)
        self._top = (torch.cat(top_ids), torch.cat(top_values)) if most else None
        # On the step's stream: result() may run with another stream current, and a step with no sampled row
        # (a prompt's middle chunk) has no sampler event to wait for.
        self._done: torch.cuda.Event | None = None
        if hidden.device.type == "cuda":
            self._done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._done.record(torch.cuda.current_stream(hidden.device))

    def result(self) -> list[tuple[str, int, PromptLogprob]]:
        """(sequence id, prompt position, score) per scored row."""
        if self._done is not None:
            self._done.synchronize()
        chosen = self._chosen.tolist()
        ids, values = (self._top[0].tolist(), self._top[1].tolist()) if self._top is not None else ([], [])
        out = []
        for i, ((seq_id, position), k) in enumerate(zip(self.scored.where, self.scored.top, strict=True)):
            top = list(zip(ids[i][:k], values[i][:k], strict=True)) if k else []
            out.append((seq_id, position, (chosen[i], top)))
        return out
