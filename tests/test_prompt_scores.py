"""prompt_scores: which rows of a step score which prompt tokens, and their logprobs computed in pieces equal the
whole-batch log_softmax."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmhost.engine.prompt_scores import PendingScores, ScoredRows, piece_rows, scored_rows


@dataclass(frozen=True)
class Chunk:
    seq_id: str
    start: int
    token_ids: tuple[int, ...]


def test_rows_score_the_next_prompt_token_and_never_past_the_prompt() -> None:
    prompt_a, prompt_b = [10, 11, 12, 13, 14], [20, 21, 22]
    chunks = [
        Chunk("a", 2, (12, 13, 14)),  # the prompt's last chunk: positions 2, 3 score 13, 14; position 4 samples
        Chunk("x", 0, (1, 2)),  # did not ask
        Chunk("b", 0, (20, 21, 22, 30, 31)),  # a preempted request's recompute: prompt, then output tokens
    ]
    got = scored_rows(chunks, {"a": (prompt_a, 2), "b": (prompt_b, 0)})
    assert got == ScoredRows(
        rows=[0, 1, 5, 6], targets=[13, 14, 21, 22], where=[("a", 3), ("a", 4), ("b", 1), ("b", 2)], top=[2, 2, 0, 0]
    )
    assert scored_rows(chunks, {"x": ([1, 2], 1)}) == ScoredRows([3], [2], [("x", 1)], [1])  # after a's 3 rows
    assert scored_rows([Chunk("a", 4, (14,))], {"a": (prompt_a, 1)}) is None  # the last position only samples


def test_scores_in_pieces_equal_the_whole_log_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    assert piece_rows(128256) == 26 and piece_rows(49152) == 68 and piece_rows(10**9) == 1
    vocab = 50_000
    rows, hidden_size = 2 * piece_rows(vocab) + 17, 8
    weight = torch.randn(vocab, hidden_size, generator=g)
    hidden = torch.randn(rows, hidden_size, generator=g)
    targets = torch.randint(0, vocab, (rows,), generator=g).tolist()
    top = [k % 4 for k in range(rows)]
    scored = ScoredRows(list(range(rows)), targets, [("s", p + 1) for p in range(rows)], top)
    heads: list[int] = []

    def head(h: torch.Tensor) -> torch.Tensor:
        heads.append(h.shape[0])
        return h @ weight.T

    got = PendingScores(head, hidden, scored, vocab).result()
    assert heads == [piece_rows(vocab), piece_rows(vocab), 17]
    want = torch.log_softmax(hidden @ weight.T, dim=-1)
    for r, (seq_id, position, (logprob, best)) in enumerate(got):
        assert (seq_id, position) == ("s", r + 1)
        assert abs(logprob - want[r, targets[r]].item()) < 1e-5
        values, ids = want[r].sort(descending=True, stable=True)
        assert [t for t, _ in best] == ids[: top[r]].tolist()
        assert all(abs(v - w) < 1e-5 for (_, v), w in zip(best, values[: top[r]].tolist(), strict=True))
