"""StopMatcher: finds stop strings in streamed text. Text that might be the start of a stop string is held back
until the next delta says whether it is, so no emitted text ever has to be taken back."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
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
        first = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if first >= 0:
            self.stopped = True
            self._held = ""
            return text[:first]
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
