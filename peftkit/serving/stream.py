"""Incremental detokenization with stop strings: text is released only once it can no longer change.

Decoding the whole output each step (outputs are short next to the model's cost) avoids the
errors of decoding token by token: a character split across byte-level tokens shows up as U+FFFD
until its last byte arrives, and is held back until then. Text that could be the start of a stop
string is held back too, so a stream never shows a piece of a stop string it later has to retract.
"""
from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one row's generated tokens, released in safe pieces, cut at the first stop string."""

    def __init__(self, tokenizer: Any, stops: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in (stops or []) if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        """How many characters of self.text have been released."""

    def push(self, token: int) -> tuple[str, bool]:
        """Return (text now safe to release, whether a stop string ended the output) after one more token."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hit = min((i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self.text = self.text[:hit]
            return self._release(hit), True
        safe = len(self.text.rstrip(REPLACEMENT))
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        return self._release(safe), False

    def flush(self) -> str:
        """Return whatever is still held back (the output has ended without a stop string)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece
