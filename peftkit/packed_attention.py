"""Attention for packed training rows: each example attends causally within itself, one SDPA call per example.

A packed row holds several examples; the collator marks where each starts (position_ids back to 0)
and builds a block-diagonal 4D mask. SDPA with an explicit mask computes every query against
every key of the row (width squared) and its CPU kernel is slow with masks; splitting the row
into its examples and calling SDPA with is_causal on each does the sum of squared example
lengths, without a mask: about a fifth of the work for five examples per row, and the fast
causal kernels. Only training forwards take this path (the row's queries and keys are the same
tokens); evaluation, generation and anything unpacked go to transformers' own SDPA.
"""
from __future__ import annotations

import contextlib
import weakref

import torch

NAME = "peftkit_packed"


_LAST: list = [None, -1, None]  # (weak reference, version, segments) of the last position_ids asked about


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Return, per row, the (start, end) of each example: a new one starts wherever position_ids is 0.

    Every layer of a forward asks about the same tensor: the answer is kept while that tensor lives unchanged.
    """
    if _LAST[0] is not None and _LAST[0]() is position_ids and _LAST[1] == position_ids._version:
        return _LAST[2]
    out = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] or [0]
        out.append(list(zip(starts, starts[1:] + [len(row)])))
    _LAST[:] = [weakref.ref(position_ids), position_ids._version, out]  # one .tolist() (a GPU sync) per forward
    return out


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                **kwargs):
    """Return (attention output as (batch, length, heads, head dim), None), computed example by example."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if not module.training or position_ids is None or query.shape[2] != key.shape[2] or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    spans_per_row = segments(position_ids)
    if len(spans_per_row) == 1:  # one position row shared by the whole batch
        spans_per_row = spans_per_row * query.shape[0]
    for b, spans in enumerate(spans_per_row):
        parts = [torch.nn.functional.scaled_dot_product_attention(
                     query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                     is_causal=True, scale=scaling, enable_gqa=gqa)
                 for s, e in spans]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make NAME a transformers attention implementation (masks, when asked for, are SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def packed_attention(model, enabled: bool):
    """Run the block with the model's SDPA attention split per packed example (when enabled and SDPA is in use)."""
    config = model.config
    if not enabled or config._attn_implementation != "sdpa":
        yield
        return
    register()
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
