"""The prompt-prefix cache: keys and values of prompt heads seen before, so a request prefills only the rest of its prompt.

Every chat request of an adapter starts with the same tokens: the template's header and the adapter's system prompt
(a few-shot completion prompt is the same story). Prefilling them again for each request is most of a short request's
time to first token on a CPU. The cache learns which heads repeat from the prompts themselves, knowing nothing of
templates: when a prompt shares at least `min_tokens` leading tokens with the previous prompt of the same adapter, or
with the previous prompt of any adapter (adapters served together tend to share a system prompt, so an adapter's first
request already keeps its head), the keys and values of those tokens are copied out of the row's own cache right after
its prefill. A later prompt
starting with a kept head joins its lane with the head already in its cache, exactly as a prefix-tuning adapter's
virtual tokens do (peftkit.methods.prompt.virtual_prefill places them), and prefills only the rest. At least one
token is always prefilled: its logits give the first generated token.

An entry is keyed by the adapter and the head's tokens, because every adapter changes the keys and values (LoRA on
k_proj and v_proj, or on any earlier layer). A prefix- or prompt-tuning adapter's entry starts with its virtual tokens,
so one lookup replaces them too. Entries count against the engine's memory budget, never exceed `max_bytes`, and go
least recently used first; the scheduler drops them before it delays a request for memory.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

from peftkit.serving.kinds import VirtualTokens

MIN_TOKENS = 8
"""Shorter shared heads are not worth an entry: prefilling 8 tokens is about as cheap as copying their cache in."""


@dataclass(frozen=True)
class Hit:
    """What a prompt found: the cache to start from (the adapter's virtual tokens and the head) and the head's length."""

    start: VirtualTokens
    tokens: int
    """Prompt tokens the entry covers (not counting the adapter's own virtual tokens)."""


class PrefixCache:
    """Heads of prompts per adapter, with their keys and values, least recently used first; at most max_bytes."""

    def __init__(self, max_bytes: int, bytes_per_token: int, min_tokens: int = MIN_TOKENS):
        self.max_bytes = max_bytes
        self.per_token = bytes_per_token
        self.min_tokens = min_tokens
        self._entries: collections.OrderedDict[tuple[str, tuple[int, ...]], VirtualTokens] = collections.OrderedDict()
        self._lengths: dict[str, collections.Counter] = {}  # adapter -> head lengths cached -> entries of that length
        self._last: dict[str | None, tuple[int, ...]] = {}  # adapter -> its last prompt prefilled; None -> anyone's
        self.bytes = 0
        self.hits = self.misses = self.tokens_saved = 0

    @property
    def enabled(self) -> bool:
        """Return True when entries may be kept at all (max_bytes holds at least one minimal head)."""
        return self.max_bytes >= self.min_tokens * self.per_token

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, adapter: str, prompt: list[int]) -> Hit | None:
        """Return the longest kept head that starts the prompt and leaves at least one token to prefill, or None."""
        if not self.enabled:
            return None
        for length in sorted(self._lengths.get(adapter, ()), reverse=True):
            if length >= len(prompt):
                continue
            key = (adapter, tuple(prompt[:length]))
            start = self._entries.get(key)
            if start is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                self.tokens_saved += length
                return Hit(start, length)
        self.misses += 1
        return None

    def worth_keeping(self, adapter: str, prompt: list[int], cached: int) -> int:
        """Return the head length to keep after this prompt's prefill (0 for none), and remember the prompt.

        The head is the most the prompt shares with the adapter's previous prompt or the previous prompt of any
        adapter, less its last token (so the same prompt sent again still has a token to prefill); it is kept when
        it is new, long enough and longer than the head the prompt already started from (`cached`).
        """
        if not self.enabled:
            return 0
        prompt = tuple(prompt)
        shared = max(_common(prompt, self._last.get(adapter, ())), _common(prompt, self._last.get(None, ())))
        self._last[adapter] = self._last[None] = prompt
        length = min(shared, len(prompt) - 1)
        if length < self.min_tokens or length <= cached or (adapter, prompt[:length]) in self._entries:
            return 0
        return length

    def put(self, adapter: str, head: tuple[int, ...], start: VirtualTokens, room: int) -> bool:
        """Keep a head's keys and values (start: virtual tokens then the head), evicting old heads to stay within
        max_bytes and within `room` bytes (what the memory budget leaves); return False when it cannot fit."""
        size = start.length * self.per_token
        if size > min(self.max_bytes, room):
            return False
        self.shrink(min(self.max_bytes, room) - size)
        key = (adapter, tuple(head))
        self._entries[key] = start
        self._lengths.setdefault(adapter, collections.Counter())[len(head)] += 1
        self.bytes += size
        return True

    def shrink(self, limit: int) -> None:
        """Drop heads, least recently used first, until the kept ones take at most limit bytes."""
        while self._entries and self.bytes > max(0, limit):
            (adapter, head), start = self._entries.popitem(last=False)
            lengths = self._lengths[adapter]
            lengths[len(head)] -= 1
            if not lengths[len(head)]:
                del lengths[len(head)]
            self.bytes -= start.length * self.per_token


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Return how many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
