"""SamplingParams: what one request asks of the sampler, validated once when the request arrives."""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmhost.errors import RequestError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
# The sampler holds every setting in float32 and divides or multiplies logits by the repetition penalty: past
# 100 either way a seen token is already out of the race, and 1e308 (inf in float32) or 1e-300 (0) would turn
# logits into inf and NaN.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
# Temperatures below this sample greedily (vLLM's rule too): a temperature that rounds to 0 in float32 divided the
# logits into NaN, and long before that the top token takes all the probability anyway.
GREEDY_BELOW = 1e-5
# OpenAI's range for logit_bias: -100 bans a token in practice, +100 makes it all but certain.
MAX_LOGIT_BIAS = 100.0
MAX_TOP_K = 2**31 - 1  # any k >= the vocabulary disables top_k; Python ints past float range would not convert
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 (and anything below GREEDY_BELOW) means greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 disables
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0 disables
    repetition_penalty: float = 1.0  # HF semantics over prompt and output tokens; 1 disables
    frequency_penalty: float = 0.0  # OpenAI semantics over output tokens, in [-2, 2]
    presence_penalty: float = 0.0  # OpenAI semantics over output tokens, in [-2, 2]
    seed: int | None = None  # same seed + same prompt = same output, also when batched with others
    stop: tuple[str, ...] = ()  # stop strings; the output ends before the first one
    include_stop_str_in_output: bool = False  # vLLM's: the output ends after the stop string instead
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the output (kept out of the text)
    ignore_eos: bool = False
    # vLLM's: EOS and stop_token_ids cannot be sampled, and stop strings do not end the output, before this many
    # tokens
    min_tokens: int = 0
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's logprob plus the top k
    # None: no prompt logprobs; k >= 0: each prompt token's logprob given the tokens before it plus the top k
    prompt_logprobs: int | None = None
    # (token id, bias) pairs added to the logits before sampling (OpenAI's logit_bias), each id once
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def uses_penalties(self) -> bool:
        """Whether sampling reads the token history (on the host)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def reads_settings(self) -> bool:
        """Whether sampling this row needs more than the argmax of its raw logits."""
        return not self.greedy or self.uses_penalties or bool(self.logit_bias)

    def validate(self) -> SamplingParams:
        """Raise RequestError naming the field and its valid range; return self for chaining."""
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            # NaN passes a one-sided check (every comparison with it is false), and JSON's NaN and Infinity
            # literals reach here through Python's json module.
            if not math.isfinite(value):
                raise RequestError(f"{name} must be a finite number, got {value}", name)
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(
                f"min_tokens must be in [0, max_tokens = {self.max_tokens}], got {self.min_tokens}", "min_tokens"
            )
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise RequestError(f"top_k must be in [0, {MAX_TOP_K}] (0 disables it), got {self.top_k}", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise RequestError(
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY:g}] (1 disables "
                f"it), got {self.repetition_penalty}",
                "repetition_penalty",
            )
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {value}", name)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}", "top_logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(
                f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}", "prompt_logprobs"
            )
        seen: set[int] = set()
        for token, bias in self.logit_bias:
            if token < 0:
                raise RequestError(f"logit_bias: {token} is not a token id (ids are >= 0)", "logit_bias")
            if token in seen:
                raise RequestError(f"logit_bias: token id {token} appears twice; send each token id once", "logit_bias")
            if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                raise RequestError(
                    f"logit_bias for token {token} must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}",
                    "logit_bias",
                )
            seen.add(token)
        if any(t < 0 for t in self.stop_token_ids):
            raise RequestError(
                f"stop_token_ids must be token ids (>= 0), got {list(self.stop_token_ids)}", "stop_token_ids"
            )
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty", "stop")
        return self
