"""What flows between callers and the engine: a request, the events it produces, its Handle and its result.

No torch here: the HTTP layer and clients of the engine import these without loading a model.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from peftkit.serving.adapters import Profile
from peftkit.serving.errors import InvalidRequestError, ServingError

SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes


@dataclass
class GenerationRequest:
    """One completion to generate: a model name and either chat messages or a raw prompt."""

    model: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None
    """Tokens to generate at most; None: whatever the context leaves."""
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def check(self) -> None:
        """Raise InvalidRequestError for sampling values the engine cannot use (the HTTP schema checks these too)."""
        if not 0 <= self.temperature <= 2:  # NaN fails every comparison
            raise InvalidRequestError(f"temperature must be from 0 to 2, got {self.temperature}", param="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be above 0 and at most 1, got {self.top_p}", param="top_p")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise InvalidRequestError(f"seed must be a 64-bit integer ({SEED_MIN} to {SEED_MAX}), got {self.seed}",
                                      param="seed")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")


@dataclass
class Event:
    """What a request produced since the last event; the last event has finish_reason set."""

    text: str = ""
    finish_reason: str | None = None
    """stop, length, cancelled or error."""
    completion_tokens: int = 0
    error: ServingError | None = None


@dataclass
class Completion:
    """A finished request: its text, why it ended and its token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]


class Handle:
    """A submitted request: its prompt size, a way to cancel it, and its events (callback or iterator)."""

    def __init__(self, profile: Profile, prompt_tokens: int, on_event: Callable[[Event], None] | None):
        self.profile = profile
        self.prompt_tokens = prompt_tokens
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.token_ids: list[int] = []
        self._queue: collections.deque[Event] | None = None if on_event else collections.deque()
        self._ready = threading.Condition()
        self._on_event = on_event

    def cancel(self) -> None:
        """Stop generating for this request at the next step (its slot and adapter pin are freed)."""
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        """Deliver an event (called by the worker); the handle is done after its last event, even if a callback raises."""
        try:
            if self._on_event is not None:
                self._on_event(event)
            else:
                with self._ready:
                    self._queue.append(event)
                    self._ready.notify_all()
        finally:
            if event.finish_reason:
                self.done.set()

    def events(self, timeout: float | None = None):
        """Yield events until the last one (only for handles submitted without a callback)."""
        while True:
            with self._ready:
                if not self._ready.wait_for(lambda: self._queue, timeout):
                    raise TimeoutError("no event from the engine in time")
                event = self._queue.popleft()
            yield event
            if event.finish_reason:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """Return the finished completion; raises the request's ServingError if it failed."""
        parts, last = [], Event()
        for last in self.events(timeout):
            parts.append(last.text)
        if last.error is not None:
            raise last.error
        return Completion("".join(parts), last.finish_reason, self.prompt_tokens, last.completion_tokens, self.token_ids)
