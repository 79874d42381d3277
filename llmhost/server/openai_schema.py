"""Pydantic models of the OpenAI API subset llmhost serves: requests parsed once at the edge, responses and stream
chunks as the official SDK reads them.

Requests allow extra fields: real clients send many (tools, response_format, logit_bias, store, metadata...), and
refusing them would break those clients. `unknown_fields()` names them so the app can log each once.

What pydantic's types cannot say (a lone surrogate in text, null content outside assistant messages, top_logprobs
without logprobs) the request models check after parsing and raise RequestError naming the field, which the app
answers with 400 like any other invalid field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from llmhost.engine.sampling_params import MAX_TOP_LOGPROBS
from llmhost.engine.tokenizer import check_prompt_switches
from llmhost.errors import RequestError

MAX_N = 16  # choices per request; each is a sequence in the batch
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's seed is a signed 64-bit integer

# A \ud800-\udfff escape in JSON that is not half of a pair decodes to a lone surrogate: a str no tokenizer (or
# UTF-8 encoder) accepts. A valid pair has already been joined into one character by the JSON parser.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _no_bool(kind: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        # pydantic reads true as 1 in lax mode: `max_tokens: true` would silently ask for one token.
        if isinstance(value, bool):
            raise PydanticCustomError("bool_not_number", f"expected {kind}, got a boolean ({str(value).lower()})")
        return value

    return BeforeValidator(check)


Int = Annotated[int, _no_bool("an integer")]
Float = Annotated[float, _no_bool("a number")]


def check_text(value: Any, where: str) -> None:
    """Raise RequestError naming the first string under `value` (str, list, dict, nested) that holds a lone
    surrogate; `where` is the field's path, e.g. 'messages[0].content'."""
    if isinstance(value, str):
        if (m := _SURROGATE.search(value)) is not None:
            raise RequestError(
                f"{where} is not valid Unicode text: lone surrogate U+{ord(m.group()):04X} at character "
                f"{m.start()}; send UTF-8 text (a \\u escape above U+FFFF needs both halves of its surrogate pair)",
                where,
            )
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_text(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, f"{where} key")
            check_text(item, f"{where}.{key}")


class Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(Lenient):
    include_usage: bool = False


class ContentPart(Lenient):
    type: str
    text: str | None = None


Role = Literal["system", "user", "assistant", "tool", "developer"]


class ChatMessage(Lenient):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def check(self, where: str) -> None:
        """Raise RequestError for what the chat template cannot take; `where` is 'messages[i]'."""
        if self.content is None and self.role != "assistant":
            raise RequestError(
                f"{where}.content is null, but a {self.role} message needs text; send a string or text parts "
                "(null content is allowed in assistant messages only)",
                f"{where}.content",
            )
        if isinstance(self.content, list):
            for j, part in enumerate(self.content):
                at = f"{where}.content[{j}]"
                if part.type != "text":
                    # Dropping the part would answer a question the client did not ask.
                    raise RequestError(
                        f"{at} has type '{part.type}', but llmhost's models take text only; send text parts "
                        "({'type': 'text', 'text': ...})",
                        f"{at}.type",
                    )
                if part.text is None:
                    raise RequestError(f"{at}.text is missing; a text part needs a 'text' string", f"{at}.text")
        check_text(
            self.content if isinstance(self.content, str) else [p.text for p in self.content or []], f"{where}.content"
        )
        check_text(self.name, f"{where}.name")
        # Extra fields (tool_calls, tool_call_id...) reach templates that use them.
        for key, value in (self.model_extra or {}).items():
            check_text(value, f"{where}.{key}")

    def template_dict(self) -> dict[str, Any]:
        """The message as a chat template reads it: content flattened to one string (text parts joined), other
        fields (name, tool_calls) passed through for templates that use them."""
        d: dict[str, Any] = {k: v for k, v in (self.model_extra or {}).items() if v is not None}
        d["role"] = self.role
        if isinstance(self.content, list):
            d["content"] = "".join(p.text or "" for p in self.content if p.type == "text")
        else:
            d["content"] = self.content or ""
        if self.name is not None:
            d["name"] = self.name
        return d


class _GenerationRequest(Lenient):
    """Fields shared by chat and completions. Ranges that SamplingParams checks (temperature, top_p, penalties)
    are checked there, once, so the messages match the engine's."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Some clients send every field, unset ones as null (`"n": null`, `"logprobs": null`); OpenAI reads those
        # as "use the default", so the defaults below apply to them too.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    model: str
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: Float | None = None
    top_p: Float | None = None
    n: Int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    user: str | None = None
    logit_bias: dict[str, Float] | None = None  # token id (a decimal string, as JSON keys are) -> bias
    # Extensions vLLM also accepts; ignore_eos is what benchmarks use to get fixed-length outputs.
    top_k: Int | None = None
    min_p: Float | None = None
    repetition_penalty: Float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Int] | None = None  # token ids that end the output, besides the model's EOS
    include_stop_str_in_output: bool = False  # the stop string that ends the output is part of it
    min_tokens: Int = Field(default=0, ge=0)  # no EOS, stop id or stop string ends the output before this many

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def prompt_logprobs(self) -> int | None:
        """Top k of the prompt tokens' logprobs to return (completions' echo with logprobs); None: not asked."""
        return None

    @property
    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs; RequestError for a key that is not a token id."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            # int() alone would take " 12", "1_000" and "+5"; OpenAI's keys are plain decimal token ids.
            if not key.isascii() or not key.isdigit():
                raise RequestError(
                    f"logit_bias key {key!r} is not a token id; keys are token ids as decimal strings, e.g. "
                    '{"50256": -100}',
                    "logit_bias",
                )
            pairs.append((int(key), bias))
        return tuple(pairs)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM's chat-template switches: continue_final_message lets a client begin the assistant's reply
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # more template variables, e.g. {"enable_thinking": false}

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        for i, message in enumerate(self.messages):
            message.check(f"messages[{i}]")
        check_prompt_switches(self.add_generation_prompt, self.continue_final_message)
        check_text(self.chat_template_kwargs, "chat_template_kwargs")
        if self.top_logprobs is not None and not self.logprobs:
            # As OpenAI answers: top_logprobs alone would be ignored without a word.
            raise RequestError(
                "top_logprobs requires logprobs to be true; send logprobs: true with it, or leave top_logprobs out",
                "top_logprobs",
            )
        return self

    @property
    def token_limit(self) -> int | None:
        # max_completion_tokens replaces the deprecated max_tokens; when both are sent, the newer one wins.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_GenerationRequest):
    # A string, a batch of strings, token ids, or a batch of token-id lists, as OpenAI's /v1/completions takes.
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False  # the prompt before the completion, in text and (with logprobs) in logprobs

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise RequestError("prompt is an empty list; send a string, strings, token ids or token-id lists", "prompt")
        for i, p in enumerate(self.prompt if isinstance(self.prompt, list) else []):
            if isinstance(p, list) and not p:
                raise RequestError(f"prompt[{i}] is an empty list of token ids; send at least one token", "prompt")
        check_text(self.prompt, "prompt")
        return self

    @property
    def prompt_count(self) -> int:
        """How many prompts the request holds (each gets n choices): a list of token ids is one prompt."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return 1
        return len(self.prompt)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None


# -- responses --------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per generated token (with echo, per prompt token
    first: the first prompt token's logprob and top logprobs are null, nothing predicts it)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


FinishReasonOut = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonOut


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonOut | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonOut | None = None


class Completion(BaseModel):
    """Both the whole response and each stream chunk (the legacy API uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    """OpenAI's id/object/created/owned_by, plus what llmhost knows about the model now."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmhost"
    state: str
    device: str
    max_seq_len: int
    memory: dict[str, int]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
