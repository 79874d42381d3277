"""TextStream: one request's tokens turned into text deltas, with stop strings applied. The engine works in token
ids; this is where stop strings end a request (finish_reason "stop") and text is never emitted twice.

It takes anything with a `token` id and a `finish_reason`: the engine's TokenOutput in-process, the host's
TokenEvent in the API process."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from llmhost.engine.engine import Engine
from llmhost.engine.sampling_params import SamplingParams
from llmhost.engine.sequence import FinishReason
from llmhost.engine.stop_strings import StopMatcher
from llmhost.engine.tokenizer import IncrementalDecoder, Tokenizer


class GeneratedToken(Protocol):
    """One generated token as the engine (TokenOutput) or the host (TokenEvent) reports it."""

    @property
    def token(self) -> int: ...

    @property
    def finish_reason(self) -> FinishReason | None: ...


@dataclass(frozen=True)
class TextDelta:
    text: str  # new text since the last delta (may be empty while a partial character or stop string waits)
    token: GeneratedToken | None  # the token that produced it; None for the final flush
    finish_reason: FinishReason | None


class TextStream:
    """Feeds one sequence's tokens; says when a stop string ended it."""

    def __init__(
        self, tokenizer: Tokenizer, stop: tuple[str, ...], min_tokens: int = 0, include_stop: bool = False
    ) -> None:
        """min_tokens: stop strings are looked for from that token on (vLLM's min_tokens); text before it is
        passed through, so a stop string that starts there is not found. include_stop: the stop string that
        ends the text is part of it."""
        self.decoder = IncrementalDecoder(tokenizer)
        self.matcher = StopMatcher(stop, include_stop)
        self.min_tokens = min_tokens
        self.tokens = 0

    def feed(self, out: GeneratedToken) -> TextDelta:
        """Text for one token. A token that ends the sequence (EOS or a stop id) adds no text of its own."""
        if out.finish_reason == "stop":
            return TextDelta(self._flush(), out, "stop")
        self.tokens += 1
        piece = self.decoder.feed(out.token)
        text = self.matcher.feed(piece) if self.tokens >= self.min_tokens else self.matcher.flush() + piece
        if self.matcher.stopped:
            return TextDelta(text, out, "stop")
        if out.finish_reason is not None:
            return TextDelta(text + self._flush(), out, out.finish_reason)
        return TextDelta(text, out, None)

    @classmethod
    def for_request(cls, tokenizer: Tokenizer, params: SamplingParams) -> TextStream:
        return cls(tokenizer, params.stop, params.min_tokens, params.include_stop_str_in_output)

    def _flush(self) -> str:
        return self.matcher.feed(self.decoder.flush()) + self.matcher.flush()


def stream_text(
    engine: Engine, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams
) -> Iterator[TextDelta]:
    """Drive `engine` until this request ends; yield its text deltas. A stop string ends the iteration, which
    aborts the request in the engine so its KV blocks are freed at once."""
    text = TextStream.for_request(tokenizer, params)
    for out in engine.stream(prompt_ids, params):
        delta = text.feed(out)
        yield delta
        if delta.finish_reason is not None:
            return
