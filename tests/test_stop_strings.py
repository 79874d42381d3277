import itertools
from dataclasses import dataclass

from checkpoint_files import smollm2_gguf
from hypothesis import given, settings
from hypothesis import strategies as st

from llmhost.engine.sequence import FinishReason
from llmhost.engine.stop_strings import StopMatcher
from llmhost.engine.text_stream import TextStream
from llmhost.engine.tokenizer import Tokenizer


def run(deltas: list[str], stops: tuple[str, ...]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.feed(d) for d in deltas)
    return out + m.flush(), m.stopped


def test_stop_split_across_deltas() -> None:
    assert run(["Hello wo", "rld. END", "ING"], ("END",)) == ("Hello world. ", True)
    assert run(["a<", "|im", "_end|>b"], ("<|im_end|>",)) == ("a", True)


def test_partial_prefix_released_when_not_a_stop() -> None:
    m = StopMatcher(("STOP",))
    assert m.feed("go ST") == "go "
    assert m.feed("ART") == "START"
    assert not m.stopped


def test_earliest_stop_wins_and_nothing_after() -> None:
    m = StopMatcher(("b", "ab"))
    assert m.feed("xxab yy") == "xx"
    assert m.stopped and m.feed("more") == "" and m.flush() == ""


def test_no_stops_passes_through() -> None:
    assert run(["a", "b"], ()) == ("ab", False)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc ", max_size=30),
    stop=st.text(alphabet="abc", min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=6),
)
def test_streamed_equals_whole_text_rule(text: str, stop: str, cuts: list[int]) -> None:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    deltas = [text[a:b] for a, b in itertools.pairwise(points)]
    idx = text.find(stop)
    expected = (text[:idx], True) if idx >= 0 else (text, False)
    assert run(deltas, (stop,)) == expected


@dataclass(frozen=True)
class _Token:
    token: int
    finish_reason: FinishReason | None = None


def streamed(stream: TextStream, ids: list[int]) -> tuple[str, FinishReason | None]:
    """Feed `ids` until the stream ends: its text and finish reason."""
    text, reason = "", None
    for t in ids:
        delta = stream.feed(_Token(t))
        text += delta.text
        reason = delta.finish_reason
        if reason is not None:
            break
    return text, reason


def test_stop_strings_count_from_min_tokens_on() -> None:
    """vLLM's min_tokens: a stop string in the first min_tokens - 1 tokens' text is passed through; from the
    min_tokens-th token on, stop strings end the output as ever."""
    tok = Tokenizer.from_gguf(smollm2_gguf())
    ids = tok.encode(" red green red green red blue")
    for min_tokens, want in ((0, ""), (1, ""), (2, " red green"), (3, " red green"), (4, " red green red green")):
        text, reason = streamed(TextStream(tok, (" red",), min_tokens), ids)
        assert reason == "stop" and text == want, (min_tokens, text)


def test_include_stop_keeps_the_stop_string_that_ended_the_text() -> None:
    m = StopMatcher(("END", "EN"), include_stop=True)
    out = m.feed("abc E") + m.feed("ND tail")
    assert out == "abc END" and m.stopped and m.flush() == ""
    # of two starting at one place, the longer one (the other is its prefix)
    m = StopMatcher(("ab", "abc"), include_stop=True)
    assert m.feed("xabcd") == "xabc"
    assert StopMatcher(("ab", "abc")).feed("xabcd") == "x"


def test_text_stream_includes_the_stop_string_when_asked() -> None:
    tok = Tokenizer.from_gguf(smollm2_gguf())
    ids = tok.encode(" red green red blue")
    for include, want in ((False, " red green"), (True, " red green red")):
        text, reason = streamed(TextStream(tok, (" red",), min_tokens=2, include_stop=include), ids)
        assert reason == "stop" and text == want
