"""Response builders: the pieces of every choice turned into OpenAI's bodies, whole or as stream chunks (SSE), for
chat (`chat.completion`) and legacy completions (`text_completion`), with usage and logprobs in each API's format.

Usage counts every generated token, the EOS token included (as vLLM does); logprobs list every token that adds
text, so EOS is left out of them.
"""

from __future__ import annotations

import time
import uuid
from functools import lru_cache

from llmhost.engine.tokenizer import Tokenizer
from llmhost.host.messages import TokenEvent
from llmhost.server.errors import ApiError
from llmhost.server.generation import FinishReason, Piece
from llmhost.server.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
)

DONE = "data: [DONE]\n\n"


def sse(json_text: str) -> str:
    return f"data: {json_text}\n\n"


def _logprob_tokens(tokens: tuple[TokenEvent, ...]) -> list[tuple[TokenEvent, float]]:
    # A token that ended the sequence by itself (EOS, a stop id) adds no text, so it gets no logprob entry.
    return [(t, t.logprob) for t in tokens if t.logprob is not None and t.finish_reason != "stop"]


class _Builder:
    def __init__(
        self,
        model: str,
        tokenizer: Tokenizer,
        num_choices: int,
        prompt_tokens: int,
        num_logprobs: int | None,
        include_usage: bool,
        id_prefix: str,
    ) -> None:
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.num_logprobs = num_logprobs
        self.include_usage = include_usage
        self.texts = [""] * num_choices
        self.reasons: list[FinishReason | None] = [None] * num_choices
        self.completion_tokens = 0
        self.token_text = lru_cache(maxsize=4096)(self._token_text)

    def _token_text(self, token: int) -> str:
        # Special tokens are shown as themselves; a token holding part of a UTF-8 character decodes to U+FFFD.
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def add(self, piece: Piece) -> None:
        self.texts[piece.index] += piece.text
        self.completion_tokens += len(piece.tokens)
        if piece.finish_reason is not None:
            self.reasons[piece.index] = piece.finish_reason

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )

    def finish_reason(self, index: int) -> FinishReason:
        return self.reasons[index] or "length"


class ChatBuilder(_Builder):
    def __init__(
        self,
        model: str,
        tokenizer: Tokenizer,
        num_choices: int,
        prompt_tokens: int,
        num_logprobs: int | None,
        include_usage: bool,
    ) -> None:
        super().__init__(model, tokenizer, num_choices, prompt_tokens, num_logprobs, include_usage, "chatcmpl")
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(num_choices)]

    def _entries(self, tokens: tuple[TokenEvent, ...]) -> list[TokenLogprob]:
        out = []
        for t, logprob in _logprob_tokens(tokens):
            text = self.token_text(t.token)
            top = [
                TopLogprob(token=(s := self.token_text(i)), logprob=lp, bytes=list(s.encode()))
                for i, lp in (t.top_logprobs or [])
            ]
            out.append(TokenLogprob(token=text, logprob=logprob, bytes=list(text.encode()), top_logprobs=top))
        return out

    def add(self, piece: Piece) -> None:
        super().add(piece)
        if self.num_logprobs is not None:
            self.logprobs[piece.index].extend(self._entries(piece.tokens))

    def response(self) -> str:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=text),
                logprobs=ChatLogprobs(content=self.logprobs[i]) if self.num_logprobs is not None else None,
                finish_reason=self.finish_reason(i),
            )
            for i, text in enumerate(self.texts)
        ]
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage()
        ).model_dump_json()

    # -- streaming ----------------------------------------------------------------------------------------------

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        c = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        return sse(c.model_dump_json(exclude=None if self.include_usage else {"usage"}))

    def start(self) -> list[str]:
        """Each choice's first chunk carries the role, as OpenAI's do."""
        return [
            self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            for i in range(len(self.texts))
        ]

    def chunk(self, piece: Piece) -> str:
        self.completion_tokens += len(piece.tokens)
        logprobs = ChatLogprobs(content=self._entries(piece.tokens)) if self.num_logprobs is not None else None
        delta = ChatDelta(content=piece.text or None)
        choice = ChatChunkChoice(index=piece.index, delta=delta, logprobs=logprobs, finish_reason=piece.finish_reason)
        return self._chunk([choice])

    def end(self) -> list[str]:
        return ([self._chunk([], self.usage())] if self.include_usage else []) + [DONE]


class CompletionBuilder(_Builder):
    def __init__(
        self,
        model: str,
        tokenizer: Tokenizer,
        num_choices: int,
        prompt_tokens: int,
        num_logprobs: int | None,
        include_usage: bool,
        echo: list[tuple[str, list[int]]] | None = None,
    ) -> None:
        """echo: each prompt's text and token ids, put before its choices' completions (choice i is prompt
        i // n's); None: no echo."""
        super().__init__(model, tokenizer, num_choices, prompt_tokens, num_logprobs, include_usage, "cmpl")
        self.logprobs = [CompletionLogprobs() for _ in range(num_choices)]
        self.offsets = [0] * num_choices  # text offset of the next token, summed over token texts
        self.echo = echo
        self.echo_pending = [echo is not None] * num_choices

    def _echo(self, piece: Piece, into: CompletionLogprobs | None) -> str:
        """The prompt's text before a choice's first piece (and its tokens' logprobs into `into`), else ''."""
        if self.echo is None or not self.echo_pending[piece.index]:
            return ""
        self.echo_pending[piece.index] = False
        text, ids = self.echo[piece.index * len(self.echo) // len(self.texts)]
        if into is not None:
            # The host sends the prompt's logprobs with a request's first token, which is in its first piece.
            scores = piece.tokens[0].prompt_logprobs if piece.tokens else None
            if scores is None or len(scores) != len(ids):
                raise ApiError(500, "the host sent no prompt logprobs for echo", "server_error", code="internal_error")
            for token, score in zip(ids, scores, strict=True):
                token_text = self.token_text(token)
                into.tokens.append(token_text)
                into.token_logprobs.append(score[0] if score is not None else None)
                into.top_logprobs.append({self.token_text(i): lp for i, lp in score[1]} if score is not None else None)
                into.text_offset.append(self.offsets[piece.index])
                self.offsets[piece.index] += len(token_text)
        return text

    def _logprobs(self, index: int, tokens: tuple[TokenEvent, ...], into: CompletionLogprobs) -> None:
        for t, logprob in _logprob_tokens(tokens):
            text = self.token_text(t.token)
            into.tokens.append(text)
            into.token_logprobs.append(logprob)
            into.top_logprobs.append({self.token_text(i): lp for i, lp in (t.top_logprobs or [])})
            into.text_offset.append(self.offsets[index])
            self.offsets[index] += len(text)

    def add(self, piece: Piece) -> None:
        logprobs = self.logprobs[piece.index] if self.num_logprobs is not None else None
        self.texts[piece.index] += self._echo(piece, logprobs)
        super().add(piece)
        if logprobs is not None:
            self._logprobs(piece.index, piece.tokens, logprobs)

    def response(self) -> str:
        choices = [
            CompletionChoice(
                index=i,
                text=text,
                logprobs=self.logprobs[i] if self.num_logprobs is not None else None,
                finish_reason=self.finish_reason(i),
            )
            for i, text in enumerate(self.texts)
        ]
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage()
        ).model_dump_json()

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        c = Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        return sse(c.model_dump_json(exclude=None if self.include_usage else {"usage"}))

    def start(self) -> list[str]:
        return []

    def chunk(self, piece: Piece) -> str:
        self.completion_tokens += len(piece.tokens)
        logprobs = CompletionLogprobs() if self.num_logprobs is not None else None
        echoed = self._echo(piece, logprobs)
        if logprobs is not None:
            self._logprobs(piece.index, piece.tokens, logprobs)
        choice = CompletionChoice(
            index=piece.index, text=echoed + piece.text, logprobs=logprobs, finish_reason=piece.finish_reason
        )
        return self._chunk([choice])

    def end(self) -> list[str]:
        return ([self._chunk([], self.usage())] if self.include_usage else []) + [DONE]


Builder = ChatBuilder | CompletionBuilder
