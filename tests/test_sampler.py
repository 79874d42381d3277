"""sampler.sample: greedy, temperature, top_k / top_p / min_p, penalties, seeds, batch independence, logprobs; and
SamplingParams.validate naming the field at fault."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from llmhost.engine.sampler import SampleOutput, make_generator, sample
from llmhost.engine.sampling_params import SamplingParams
from llmhost.errors import RequestError

CPU = torch.device("cpu")
CHI2_CRITICAL_P001 = {2: 13.82, 3: 16.27, 5: 20.52}  # chi-square quantile 0.999 by degrees of freedom


def run(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator] | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
) -> SampleOutput:
    rows = logits.shape[0]
    return sample(
        logits,
        params,
        generators if generators is not None else [make_generator(r, CPU) for r in range(rows)],
        prompts if prompts is not None else [[] for _ in range(rows)],
        outputs if outputs is not None else [[] for _ in range(rows)],
    )


def draw_many(logits: list[float], params: SamplingParams, n: int = 20000, seed: int = 7) -> list[int]:
    """n independent draws from one distribution: n rows sharing one seeded generator."""
    generator = make_generator(seed, CPU)
    batch = torch.tensor([logits]).repeat(n, 1)
    return run(batch, [params] * n, [generator] * n).tokens


def chi_square(tokens: list[int], expected_probs: list[float]) -> float:
    n = len(tokens)
    observed = [tokens.count(t) for t in range(len(expected_probs))]
    return sum((o - n * p) ** 2 / (n * p) for o, p in zip(observed, expected_probs, strict=True) if p > 0)


def greedy_token(logits: list[float], prompt: Sequence[int] = (), output: Sequence[int] = (), **params: Any) -> int:
    result = run(torch.tensor([logits]), [SamplingParams(temperature=0.0, **params)], None, [prompt], [output])
    return result.tokens[0]


# --- greedy and filters ---


def test_greedy_is_argmax_for_any_float_dtype() -> None:
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cast_logits = logits.to(dtype)
        result = run(cast_logits, [SamplingParams(temperature=0.0)] * 16)
        assert result.tokens == cast_logits.float().argmax(dim=-1).tolist()


def test_greedy_draws_no_randomness() -> None:
    generator = make_generator(3, CPU)
    before = generator.get_state()
    run(torch.randn(2, 50), [SamplingParams(temperature=0.0)] * 2, [generator, generator])
    assert torch.equal(generator.get_state(), before)


def test_temperature_sampling_matches_softmax() -> None:
    logits = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0]
    temperature = 0.7
    expected = torch.softmax(torch.tensor(logits) / temperature, dim=-1).tolist()
    tokens = draw_many(logits, SamplingParams(temperature=temperature))
    assert chi_square(tokens, expected) < CHI2_CRITICAL_P001[5]


def test_top_k_one_equals_greedy() -> None:
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(1))
    result = run(logits, [SamplingParams(temperature=1.5, top_k=1)] * 64)
    assert result.tokens == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_k_tokens_in_their_renormalized_proportions() -> None:
    logits = [0.0, 2.0, 1.0, 1.9, -1.0]
    tokens = draw_many(logits, SamplingParams(top_k=3))
    assert set(tokens) == {1, 2, 3}
    kept = torch.softmax(torch.tensor([2.0, 1.0, 1.9]), dim=-1).tolist()
    assert chi_square(tokens, [0.0, *kept, 0.0]) < CHI2_CRITICAL_P001[2]


def test_small_top_p_keeps_only_the_top_token() -> None:
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(2))
    result = run(logits, [SamplingParams(top_p=0.01)] * 64)
    assert result.tokens == logits.argmax(dim=-1).tolist()


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = [math.log(p) for p in probs]
    # 0.5 < 0.6, so the second token is needed; 0.8 >= 0.6, so the third is not.
    tokens = draw_many(logits, SamplingParams(top_p=0.6))
    assert set(tokens) == {0, 1}
    assert chi_square(tokens, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]) < CHI2_CRITICAL_P001[2]
    # The third token enters once the mass above it (0.8) is below top_p.
    assert set(draw_many(logits, SamplingParams(top_p=0.79), n=2000)) == {0, 1}
    assert set(draw_many(logits, SamplingParams(top_p=0.81), n=2000)) == {0, 1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_top() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = [math.log(p) for p in probs]
    # Floor 0.5 x 0.5 = 0.25: keeps 0.5 and 0.3.
    tokens = draw_many(logits, SamplingParams(min_p=0.5))
    assert set(tokens) == {0, 1}
    assert chi_square(tokens, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]) < CHI2_CRITICAL_P001[2]
    assert set(draw_many(logits, SamplingParams(min_p=0.2), n=2000)) == {0, 1, 2}


def test_filters_compose_top_k_then_top_p() -> None:
    probs = [0.4, 0.3, 0.2, 0.1]
    logits = [math.log(p) for p in probs]
    # After top_k=2 the kept mass renormalizes to 4/7 and 3/7, so top_p=0.5 keeps the first token only.
    assert set(draw_many(logits, SamplingParams(top_k=2, top_p=0.5), n=2000)) == {0}
    assert set(draw_many(logits, SamplingParams(top_k=2, top_p=0.6), n=2000)) == {0, 1}


@pytest.mark.parametrize("temperature", [2e-5, 1e-30, 1e-50])  # sampled; greedy below 1e-5 (1e-50 is 0 in float32)
def test_tiny_temperature_is_stable_and_picks_the_top_token(temperature: float) -> None:
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(4)) * 30
    assert SamplingParams(temperature=temperature).greedy == (temperature < 1e-5)
    result = run(logits, [SamplingParams(temperature=temperature, logprobs=1)] * 8)
    assert result.tokens == logits.argmax(dim=-1).tolist()
    assert all(lp is not None and math.isfinite(lp) for lp in result.logprobs)


def test_a_top_p_below_the_fixed_point_unit_still_keeps_the_top_token() -> None:
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(5))
    result = run(logits, [SamplingParams(top_p=1e-15)] * 16)  # 1e-15 x 2**40 truncates to 0
    assert result.tokens == logits.argmax(dim=-1).tolist()


# --- penalties (greedy, with a competitor placed just either side of the predicted penalized logit) ---


def test_repetition_penalty_divides_positive_logits_of_prompt_and_output_tokens() -> None:
    # 2.0 / 1.25 = 1.6
    assert greedy_token([2.0, 1.61], prompt=[0], repetition_penalty=1.25) == 1
    assert greedy_token([2.0, 1.59], prompt=[0], repetition_penalty=1.25) == 0
    assert greedy_token([2.0, 1.61], output=[0], repetition_penalty=1.25) == 1
    assert greedy_token([2.0, 1.61], prompt=[1], repetition_penalty=1.25) == 0  # only seen tokens


def test_repetition_penalty_multiplies_negative_logits() -> None:
    # -1.0 x 1.25 = -1.25
    assert greedy_token([-1.0, -1.24], output=[0], repetition_penalty=1.25) == 1
    assert greedy_token([-1.0, -1.26], output=[0], repetition_penalty=1.25) == 0
    # A penalty below 1 rewards: -1.0 x 0.5 = -0.5, 1.0 / 0.5 = 2.0.
    assert greedy_token([-1.0, -0.51], prompt=[0], repetition_penalty=0.5) == 0
    assert greedy_token([1.0, 1.99], prompt=[0], repetition_penalty=0.5) == 0


def test_repetition_penalty_counts_a_token_once() -> None:
    assert greedy_token([2.0, 1.59], prompt=[0, 0, 0], output=[0, 0], repetition_penalty=1.25) == 0


def test_frequency_penalty_scales_with_output_count_only() -> None:
    # 3.0 - 3 x 0.4 = 1.8
    assert greedy_token([3.0, 1.81], output=[0, 0, 0], frequency_penalty=0.4) == 1
    assert greedy_token([3.0, 1.79], output=[0, 0, 0], frequency_penalty=0.4) == 0
    assert greedy_token([3.0, 1.81], prompt=[0, 0, 0], frequency_penalty=2.0) == 0  # prompt tokens do not count
    # Negative values reward repetition: 1.0 + 2 x 0.5 = 2.0.
    assert greedy_token([1.0, 1.99], output=[0, 0], frequency_penalty=-0.5) == 0


def test_presence_penalty_is_flat_per_output_token() -> None:
    # 3.0 - 1.1 = 1.9, however often the token appeared
    assert greedy_token([3.0, 1.91], output=[0], presence_penalty=1.1) == 1
    assert greedy_token([3.0, 1.89], output=[0, 0, 0, 0], presence_penalty=1.1) == 0
    assert greedy_token([3.0, 1.91], prompt=[0], presence_penalty=2.0) == 0


def test_repetition_penalty_applies_before_frequency_and_presence() -> None:
    # 3.0 / 2 - 1 x 0.5 - 0.5 = 0.5; the other order would give (3.0 - 0.5 - 0.5) / 2 = 1.0.
    for competitor, expected in ((0.51, 1), (0.49, 0)):
        token = greedy_token(
            [3.0, competitor], output=[0], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.5
        )
        assert token == expected


def test_penalties_apply_before_sampling_too() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.9]] * 500)
    params = SamplingParams(presence_penalty=2.0, frequency_penalty=2.0, min_p=0.5)
    # Without history the penalties have nothing to act on and min_p keeps only token 0; with token 0 already in
    # the output its logit drops to 5 - 2 - 2 = 1.0 and all three tokens pass min_p.
    fresh = run(logits, [params] * 500, [make_generator(7, CPU)] * 500)
    assert set(fresh.tokens) == {0}
    repeated = run(logits, [params] * 500, [make_generator(7, CPU)] * 500, outputs=[[0]] * 500)
    assert set(repeated.tokens) == {0, 1, 2}


# --- logit_bias ---


def test_logit_bias_moves_the_greedy_choice_both_ways() -> None:
    logits = [3.0, 2.5, -1.0, 0.0]
    assert greedy_token(logits) == 0
    assert greedy_token(logits, logit_bias=((0, -100.0),)) == 1  # banned
    assert greedy_token(logits, logit_bias=((2, 100.0),)) == 2  # forced
    assert greedy_token(logits, logit_bias=((1, 0.6),)) == 1  # 2.5 + 0.6 passes 3.0
    assert greedy_token(logits, logit_bias=((1, 0.4),)) == 0  # 2.9 does not


def test_banned_tokens_are_never_sampled_and_only_in_their_row() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]] * 3)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)]
    for _ in range(50):
        result = sample(logits, params, [make_generator(None, CPU) for _ in range(3)], [[]] * 3, [[]] * 3,
                        [(0,), (0, 1), ()])  # fmt: skip
        assert result.tokens[0] == 1 and result.tokens[1] in (2, 3) and result.tokens[2] == 0


def test_logit_bias_applies_before_temperature_and_the_filters() -> None:
    logits = [2.0, 1.0, 0.5, 0.0]
    bias = ((0, -2.0), (3, 1.0))
    temperature = 0.7
    shifted = torch.tensor(logits) + torch.tensor([-2.0, 0.0, 0.0, 1.0])
    expected = torch.softmax(shifted / temperature, dim=-1).tolist()
    tokens = draw_many(logits, SamplingParams(temperature=temperature, logit_bias=bias))
    assert chi_square(tokens, expected) < CHI2_CRITICAL_P001[3]
    # top_k sees the biased scores: token 3 (0 + 2.1) passes token 0 (2.0) and is the only one kept
    assert set(draw_many(logits, SamplingParams(top_k=1, logit_bias=((3, 2.1),)), n=500)) == {3}


def test_logit_bias_leaves_logprobs_raw_and_other_rows_alone() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    params = [SamplingParams(temperature=0.0, logprobs=1, logit_bias=((0, 100.0),)), SamplingParams(temperature=0.0)]
    result = run(logits, params)
    assert result.tokens == [0, 2]
    raw = torch.log_softmax(logits[0], dim=-1)
    assert result.logprobs[0] == pytest.approx(raw[0].item())
    assert result.top_logprobs[0] == [(2, pytest.approx(raw[2].item()))]


# --- seeds and batch independence ---


def steps(seed: int, params: SamplingParams, n: int = 30, vocab: int = 50) -> list[int]:
    logits_gen = torch.Generator().manual_seed(99)
    generator = make_generator(seed, CPU)
    out: list[int] = []
    for _ in range(n):
        logits = torch.randn(1, vocab, generator=logits_gen)
        out += run(logits, [params], [generator], [[1, 2]], [out]).tokens
    return out


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    params = SamplingParams(temperature=1.0)
    assert steps(1234, params) == steps(1234, params)
    assert steps(1234, params) != steps(1235, params)


def test_unseeded_generators_differ_and_any_integer_seed_is_accepted() -> None:
    params = SamplingParams(temperature=1.0)
    first, second = make_generator(None, CPU), make_generator(None, CPU)
    logits = torch.zeros(1, 1000)
    draws = [(run(logits, [params], [first]).tokens, run(logits, [params], [second]).tokens) for _ in range(5)]
    assert any(a != b for a, b in draws)
    for seed in (-1, 0, 2**64 - 1, 2**80):
        make_generator(seed, CPU)


def test_every_row_samples_the_same_alone_or_in_a_batch() -> None:
    # Active settings in one row sit beside neutral ones in the others, so a stage leaking across rows shows up.
    everything = SamplingParams(
        temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3, frequency_penalty=0.5,
        presence_penalty=0.3, logprobs=3, logit_bias=((7, 5.0), (199, -100.0), (0, 1.5)),
    )  # fmt: skip
    requests = [  # (params, seed, prompt)
        (everything, 11, [5, 6, 7, 5]),
        (SamplingParams(temperature=0.0, repetition_penalty=1.1, logprobs=5), 1, [1, 2, 3]),
        (SamplingParams(temperature=1.3, top_p=0.5, frequency_penalty=-1.0), 11, [9] * 20),  # row 0's seed
        (SamplingParams(temperature=1.0), 2, []),
    ]
    logits_gen = torch.Generator().manual_seed(5)
    solo_gens = [make_generator(seed, CPU) for _, seed, _ in requests]
    batch_gens = [make_generator(seed, CPU) for _, seed, _ in requests]
    solo_outputs: list[list[int]] = [[] for _ in requests]
    batch_outputs: list[list[int]] = [[] for _ in requests]
    for step in range(50):
        logits = torch.randn(len(requests), 200, generator=logits_gen) * 3  # [request, V]
        order = [(step + i) % len(requests) for i in range(len(requests))]  # each step a different batch position
        batch = run(
            logits[order],
            [requests[i][0] for i in order],
            [batch_gens[i] for i in order],
            [requests[i][2] for i in order],
            [batch_outputs[i] for i in order],
        )
        for position, i in enumerate(order):
            solo = run(logits[i : i + 1], [requests[i][0]], [solo_gens[i]], [requests[i][2]], [solo_outputs[i]])
            assert batch.tokens[position] == solo.tokens[0]
            assert batch.logprobs[position] == solo.logprobs[0]
            assert batch.top_logprobs[position] == solo.top_logprobs[0]
            solo_outputs[i].append(solo.tokens[0])
            batch_outputs[i].append(batch.tokens[position])
    assert all(len(set(out)) > 10 for out in solo_outputs)  # every row really varied


# --- logprobs ---


def test_logprobs_are_raw_log_softmax_at_the_sampled_token() -> None:
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(6)) * 2
    params = [
        SamplingParams(temperature=0.5, top_k=5, repetition_penalty=1.5, logprobs=0),
        SamplingParams(temperature=0.0, frequency_penalty=1.0, logprobs=4),
        SamplingParams(temperature=1.0),
    ]
    result = run(logits, params, None, [[1, 2, 3]] * 3, [[4, 4, 5]] * 3)
    raw = torch.log_softmax(logits, dim=-1)
    assert all(type(token) is int for token in result.tokens)
    for r in (0, 1):
        logprob = result.logprobs[r]
        assert logprob is not None
        assert logprob == pytest.approx(raw[r, result.tokens[r]].item(), abs=1e-6)
    assert result.logprobs[2] is None
    assert result.top_logprobs[0] == []
    assert result.top_logprobs[2] is None


def test_top_logprobs_are_the_k_best_descending() -> None:
    logits = torch.randn(2, 100, generator=torch.Generator().manual_seed(8))
    result = run(logits, [SamplingParams(logprobs=5), SamplingParams(logprobs=20)])
    raw = torch.log_softmax(logits, dim=-1)
    for r, k in ((0, 5), (1, 20)):
        top = result.top_logprobs[r]
        assert top is not None
        assert len(top) == k
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        expected = torch.topk(raw[r], k)
        assert [t for t, _ in top] == expected.indices.tolist()
        assert values == pytest.approx(expected.values.tolist(), abs=1e-6)


def test_tied_top_logprobs_are_ordered_by_token_id_whatever_k() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0]])
    for k in (1, 2, 4, 6):
        top = run(logits, [SamplingParams(logprobs=k)]).top_logprobs[0]
        assert top is not None
        assert [t for t, _ in top] == [1, 3, 4, 0, 2, 5][:k]


def test_top_logprobs_stop_at_the_vocabulary_size() -> None:
    result = run(torch.randn(1, 4), [SamplingParams(logprobs=20)])
    top = result.top_logprobs[0]
    assert top is not None and len(top) == 4


def test_mismatched_lengths_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="2 logit rows but 1 params"):
        sample(torch.zeros(2, 5), [SamplingParams()], [make_generator(0, CPU)] * 2, [[], []], [[], []])
    with pytest.raises(ValueError, match="rows, vocab"):
        sample(torch.zeros(5), [SamplingParams()], [make_generator(0, CPU)], [[]], [[]])


# --- SamplingParams.validate ---


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("temperature", -0.1, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -1, "top_k"),
        ("min_p", 2.0, "min_p"),
        ("frequency_penalty", 3.0, "frequency_penalty"),
        ("presence_penalty", -2.5, "presence_penalty"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("logprobs", 21, "top_logprobs"),
        ("max_tokens", 0, "max_tokens"),
        ("stop", ("end", ""), "stop"),
        ("prompt_logprobs", 21, "prompt_logprobs"),
        ("prompt_logprobs", -1, "prompt_logprobs"),
        ("logit_bias", ((5, 100.5),), "logit_bias"),
        ("logit_bias", ((5, float("nan")),), "logit_bias"),
        ("logit_bias", ((-1, 1.0),), "logit_bias"),
        ("logit_bias", ((5, 1.0), (5, 2.0)), "logit_bias"),
    ],
)
def test_validate_names_the_field_at_fault(field: str, value: Any, param: str) -> None:
    with pytest.raises(RequestError) as info:
        SamplingParams(**{field: value}).validate()
    assert info.value.param == param


def test_validate_accepts_the_boundaries() -> None:
    params = SamplingParams(
        max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, min_p=1.0, frequency_penalty=-2.0, presence_penalty=2.0,
        logprobs=20, stop=("x",), logit_bias=((0, -100.0), (1, 100.0)),
    )  # fmt: skip
    assert params.validate() is params
