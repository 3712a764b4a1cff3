"""Packing several examples into one sequence, and the collator that batches rows for model(**batch).

A packed row holds examples back to back with position_ids restarting at 0 for each, so rotary
positions match the example alone. Attention is isolated per example by the collator:
- sdpa / eager: an explicit 4D block-diagonal causal mask (bool for sdpa, additive float for eager).
  transformers would build the same mask from position_ids only when attention_mask is None *and*
  no KV cache exists, but a model called in training mode with config.use_cache=True creates a
  DynamicCache and silently skips that detection; an explicit mask does not depend on it.
- flash_attention_2/3: the whole batch becomes one row with position_ids and no mask, which
  transformers turns into variable-length (cu_seqlens) attention.
Loss needs nothing extra: every example's first label is -100 (see masks.py), so no token is
predicted across a boundary, and padding is labelled -100.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Any

from peftkit.data.errors import DataError
from peftkit.data.masks import IGNORE

FLASH = ("flash_attention_2", "flash_attention_3")
MASKED = ("sdpa", "eager")


def pack(lengths: list[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Return groups of example indices whose lengths fit in capacity (best-fit decreasing, groups shuffled)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), kept sorted for bisect
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"example {i} has {size} tokens, more than the pack capacity {capacity}")
        k = bisect.bisect_left(free, (size, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
        else:
            space, b = capacity, len(bins)
            bins.append([i])
        if space - size > 0:
            bisect.insort(free, (space - size, b))
    # Best-fit puts the longest examples first; shuffling the packs keeps length from tracking training time.
    random.Random(seed).shuffle(bins)
    return bins


def packed_rows(examples: list[tuple[list[int], list[int]]], capacity: int, seed: int = 0) -> dict[str, list[list[int]]]:
    """Return columns input_ids, labels, position_ids of the packed sequences for (input_ids, labels) examples."""
    cols: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for group in pack([len(ids) for ids, _ in examples], capacity, seed):
        ids, labels, positions = [], [], []
        for i in group:
            ids.extend(examples[i][0])
            labels.extend(examples[i][1])
            positions.extend(range(len(examples[i][0])))
        cols["input_ids"].append(ids)
        cols["labels"].append(labels)
        cols["position_ids"].append(positions)
    return cols


def split_packed(position_ids: list[int]) -> list[tuple[int, int]]:
    """Return (start, end) of each example inside a packed row (each starts where position_ids is 0)."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] or [0]
    return list(zip(starts, starts[1:] + [len(position_ids)]))


@dataclass
class Collator:
    """Turns a list of rows into padded torch tensors for model(**batch)."""

    pad_id: int
    packing: bool = False
    attn_implementation: str = "sdpa"
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if not self.packing and any("position_ids" in r for r in rows):
            raise DataError("these rows are packed (they carry position_ids) but the collator was built with "
                            "packing=False, which would let examples attend to each other; use "
                            "build_collator(tokenizer, packing=True)")
        if self.packing and self.attn_implementation in FLASH:
            return self._flat(rows, torch)
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            labels[b, : len(r["labels"])] = torch.tensor(r["labels"])
        if not self.packing:
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for b, r in enumerate(rows):
                attention[b, : len(r["input_ids"])] = 1
            return {"input_ids": ids, "attention_mask": attention, "labels": labels}
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            positions[b, :n] = torch.tensor(r.get("position_ids", range(n)))
            positions[b, n:] = torch.arange(width - n)  # padding forms its own block, so no row is fully masked
        return {"input_ids": ids, "labels": labels, "position_ids": positions,
                "attention_mask": self._block_mask(positions, torch)}

    def _block_mask(self, positions, torch):
        # Example ids: a new example starts wherever position_ids returns to 0.
        segment = (positions == 0).cumsum(dim=1)
        same = segment[:, :, None] == segment[:, None, :]
        width = positions.shape[1]
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        mask = (same & causal)[:, None, :, :]
        if self.attn_implementation == "eager":
            # eager adds the mask to the scores; float32 promotes bf16/fp16 scores safely before the softmax.
            return torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, torch.finfo(torch.float32).min)
        return mask

    def _flat(self, rows, torch):
        ids, labels, positions = [], [], []
        for r in rows:
            ids.extend(r["input_ids"])
            labels.extend(r["labels"])
            positions.extend(r.get("position_ids", range(len(r["input_ids"]))))
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}


def build_collator(tokenizer: Any, packing: bool = False, attn_implementation: str = "sdpa",
                   pad_to_multiple_of: int | None = None) -> Collator:
    """Return the collator for prepared rows: padded ids, labels and the attention inputs packing needs."""
    if packing and attn_implementation not in MASKED + FLASH:
        raise DataError(f"data.packing=true works with model.attn_implementation sdpa, eager, flash_attention_2 or "
                        f"flash_attention_3, not {attn_implementation!r}; change one of them")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token to pad batches with; give it a pad token")
    return Collator(pad_id, packing, attn_implementation, pad_to_multiple_of)
