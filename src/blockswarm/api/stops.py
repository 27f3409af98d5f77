"""Stop strings on a stream of text: emit what cannot be the start of a stop string, hold the rest.

A stop string may arrive split across tokens ("\\n\\n" as "\\n" then "\\n"), so text that could still
grow into one is held back until it either completes it (and the stream ends before it) or cannot.
Work per piece is bounded by the longest stop string, not by the length of the output.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [stop for stop in stops if stop]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached: then nothing after it is sent)."""
        if not self.stops:
            return text, False
        self.pending += text
        # the stop string complete first (however the text was split into tokens): the earliest end,
        # and of two ending together the one that begins first; nothing after its start is sent
        found = [(index + len(stop), index) for stop in self.stops if (index := self.pending.find(stop)) >= 0]
        if found:
            out, self.pending = self.pending[:min(found)[1]], ""
            return out, True
        hold = max((k for stop in self.stops for k in range(1, min(len(stop), len(self.pending) + 1))
                    if self.pending.endswith(stop[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """What was held back, once the stream ends without reaching a stop string."""
        out, self.pending = self.pending, ""
        return out
