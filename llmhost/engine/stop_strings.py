"""StopMatcher: finds stop strings in streamed text. Text that might be the start of a stop string is held back
until the next delta says whether it is, so no emitted text ever has to be taken back."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...], include_stop: bool = False) -> None:
        """include_stop: the stop string that ends the text is part of it (vLLM's include_stop_str_in_output)."""
        self.stops = tuple(s for s in stops if s)
        self.include_stop = include_stop
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Return the text that is safe to emit now. After a stop string is found, `stopped` is True, the text
        before it has been returned, and everything from the stop string on is dropped."""
        if self.stopped:
            return ""
        text = self._held + delta
        if not self.stops:
            return text
        found = [(i, -len(s)) for s in self.stops if (i := text.find(s)) >= 0]
        if found:
            # The earliest stop string; of several starting there, the longest (the others are its prefixes).
            first, minus_len = min(found)
            self.stopped = True
            self._held = ""
            return text[: first - minus_len] if self.include_stop else text[:first]
        keep = self._longest_partial(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of generation: what was held back was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
