"""Continuous batching: rows (requests being generated) share forward passes, joining and leaving per step.

A Lane is a set of rows that run one forward together: their prompts left-padded to one width,
one KV cache, one 2-D attention mask, and per-row position ids. Rows join a running lane by
prefilling on their own cache, which is then padded on the left and stacked under the lane's;
rows leave by selecting the remaining batch indices, and columns that only padding still uses
are trimmed away. Pad columns are masked out of attention and every row keeps its own
positions, so what a row generates does not depend on its batch-mates (a test holds us to it).
A prefill's mask and positions come from peftkit.methods.prompt.virtual_prefill, which places a
prefix/prompt adapter's virtual tokens as training placed them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

# forward(input_ids, attention_mask, position_ids, cache, adapter_names, inputs_embeds) -> last position's logits [B, V]
# (input_ids is None when inputs_embeds carries the input instead).
Forward = Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor, Any, list[str], torch.Tensor | None], torch.Tensor]


@dataclass(eq=False)
class Row:
    """One request being generated: its prompt, sampling settings and what it has produced so far."""

    prompt_ids: list[int]
    adapter: str
    """The adapter this row runs (its cache key), or "__base__" for the base model."""
    peft_name: str
    """The name handed to peft's adapter_names: the adapter for LoRA rows, "__base__" for every other row."""
    max_tokens: int
    stop_ids: frozenset[int]
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    position: int = 0
    """Position id of the next token fed to the model (the number of real tokens it has seen)."""
    pinned: bool = False
    """The row holds a pin on its adapter in the cache (released when it finishes)."""
    owner: Any = None
    """The engine's bookkeeping for this row (handle, text emitted, ...)."""
    virtual: Any = None
    """A prefix/prompt adapter's VirtualTokens (peftkit.serving.kinds), put in front of the prompt at prefill."""
    reserve: int = 0
    """KV-cache positions the row may fill at most: its virtual tokens, prompt and max_tokens (the memory budget's unit)."""
    cached: int = 0
    """Leading prompt tokens whose keys and values `virtual` already holds (a prompt-prefix cache hit): not prefilled."""

class Lane:
    """Rows sharing one KV cache and one forward per step."""

    solo = False
    """True where each row runs its own forwards (SoloLane)."""

    def __init__(self, forward: Forward, pad_id: int, device: torch.device | str = "cpu",
                 embed: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.forward = forward
        self.embed = embed  # the base's input embedding, for rows that start with prompt-tuning embeddings
        self.pad_id = pad_id
        self.device = device
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None

    def add(self, rows: list[Row]) -> torch.Tensor:
        """Return the next-token logits of the new rows after prefilling their prompts into the lane.

        Rows added together share their virtual tokens (the same prefix/prompt adapter, the same cached prompt head, or
        none): the engine groups them so. A row's first `cached` prompt tokens are in those virtual tokens already.
        """
        from transformers import DynamicCache

        from peftkit.methods.prompt import virtual_prefill

        virtual = rows[0].virtual
        n = virtual.length if virtual is not None else 0
        in_cache = virtual is not None and virtual.kind == "prefix"  # prefix tuning: keys and values, not embeddings
        prompts = [r.prompt_ids[r.cached:] for r in rows]
        mask, positions, pads = virtual_prefill([len(p) for p in prompts], n, in_cache=in_cache, device=self.device)
        ids = torch.tensor([[self.pad_id] * p + prompt for p, prompt in zip(pads, prompts)], device=self.device)
        cache, embeds = DynamicCache(), None
        if in_cache:  # each layer's cache starts with the learned keys and values
            for layer, (k, v) in enumerate(zip(virtual.keys, virtual.values)):
                cache.update(k.expand(len(rows), *k.shape), v.expand(len(rows), *v.shape), layer)
        elif n:  # prompt-tuning embeddings: in the input, right after the padding
            tokens = self.embed(ids)
            learned = virtual.embeddings.to(tokens.dtype)
            embeds = torch.stack([torch.cat([tokens[i, :p], learned, tokens[i, p:]]) for i, p in enumerate(pads)])
            ids = None
        logits = self.forward(ids, mask, positions, cache, [r.peft_name for r in rows], embeds)
        for r, prompt in zip(rows, prompts):
            r.position = n + len(prompt)
        self._stack(rows, cache, mask)
        return logits

    def head(self, row: Row, length: int):
        """Return a row's first `length` cached positions (virtual tokens included) as prefix-style VirtualTokens."""
        from peftkit.serving.kinds import VirtualTokens

        i = next(i for i, r in enumerate(self.rows) if r is row)
        columns = self.mask[i].nonzero().flatten()[:length]  # the row's own positions, in order, wherever padding sits
        keys = tuple(layer.keys[i][:, columns] for layer in self.cache.layers)  # indexing copies: the lane may change
        values = tuple(layer.values[i][:, columns] for layer in self.cache.layers)
        return VirtualTokens("prefix", length, keys=keys, values=values)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Return the next-token logits of every row after feeding each row its latest token."""
        ids = torch.tensor([[t] for t in tokens], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        positions = torch.tensor([[r.position] for r in self.rows], device=self.device)
        logits = self.forward(ids, self.mask, positions, self.cache, [r.peft_name for r in self.rows], None)
        for r in self.rows:
            r.position += 1
        return logits

    def remove(self, leaving: list[Row]) -> None:
        """Drop rows from the lane (finished or cancelled), freeing their part of the cache."""
        gone = {id(r) for r in leaving}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask[index]
        first = int((self.mask.sum(0) > 0).nonzero()[0])  # columns before this are padding for every row left
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]

    def clear(self) -> None:
        """Drop every row and the cache (when the lane's state can no longer be trusted)."""
        self.rows, self.cache, self.mask = [], None, None

    def _stack(self, rows: list[Row], cache, mask: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        # Build every new tensor before changing the lane: a failure here (out of memory) leaves the lane as it was.
        stacked = [(torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0),
                    torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0))
                   for old, new in zip(self.cache.layers, cache.layers)]
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)), F.pad(mask, (width - mask.shape[1], 0))])
        for layer, (keys, values) in zip(self.cache.layers, stacked):
            layer.keys, layer.values = keys, values
        self.rows.extend(rows)


class SoloLane(Lane):
    """A lane whose rows never share a forward (--batch-invariant): each runs alone, batch of one, on its own cache.

    A row's every forward then has the shapes, kernels and reduction orders it would have were it the only request,
    so its answer cannot depend on its batch-mates or on padding, in any dtype and on any machine. Batching's
    throughput is what it costs (docs/serving.md).
    """

    solo = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lanes: list[Lane] = []  # one single-row Lane per row, in the order of self.rows

    def add(self, rows: list[Row]) -> torch.Tensor:
        """Return the next-token logits of the new rows, each prefilled alone."""
        lanes, logits = [], []
        for row in rows:
            lane = Lane(self.forward, self.pad_id, self.device, embed=self.embed)
            logits.append(lane.add([row]))
            lanes.append(lane)
        self.lanes += lanes  # only once every row is prefilled: a failure leaves the lane as it was
        self.rows += rows
        return torch.cat(logits)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Return the next-token logits of every row, each fed its latest token alone."""
        return torch.cat([lane.step([token]) for lane, token in zip(self.lanes, tokens)])

    def remove(self, leaving: list[Row]) -> None:
        """Drop rows from the lane (finished or cancelled), with their caches."""
        gone = {id(r) for r in leaving}
        self.lanes = [lane for lane in self.lanes if id(lane.rows[0]) not in gone]
        self.rows = [lane.rows[0] for lane in self.lanes]

    def head(self, row: Row, length: int):
        """Return a row's first `length` cached positions as prefix-style VirtualTokens."""
        return next(lane for lane in self.lanes if lane.rows[0] is row).head(row, length)

    def clear(self) -> None:
        """Drop every row and cache."""
        super().clear()
        self.lanes = []


def _left_pad(kv: torch.Tensor, width: int) -> torch.Tensor:
    # kv is [batch, heads, seq, head_dim]; zeros (not garbage) so masked columns stay finite.
    return F.pad(kv, (0, 0, width - kv.shape[2], 0))


GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily: dividing logits by them overflows float32 (1e-40 turns every logit into
inf, and softmax into NaN), and what they would sample is the argmax anyway."""


def pick_tokens(logits: torch.Tensor, rows: list[Row]) -> list[int | None]:
    """Return each row's next token: argmax at temperature 0 (or below GREEDY_BELOW), else a sample from its own
    generator; None for a row whose logits hold NaN or inf (the model failed on it; its batch-mates are unaffected)."""
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    chosen: list[int | None] = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if not finite[i]:
            chosen[i] = None
        elif row.temperature >= GREEDY_BELOW:
            chosen[i] = sample(logits[i], row.temperature, row.top_p, row.generator)
    return chosen


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Return one token drawn from softmax(logits / temperature), restricted to the top_p nucleus (logits finite)."""
    logits = logits.float()
    # Shift before dividing: (logits - max) / t is at most 0, so it never overflows to inf, whatever t is.
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p, and always the most likely token: a top_p below
        # float32's smallest number (5e-324) would otherwise compare as 0 and leave nothing to draw from.
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        outside[0] = False
        sorted_probs[outside] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
