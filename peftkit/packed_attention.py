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
import functools
import time
import weakref

import torch

NAME = "peftkit_packed"


_LAST: list = [None, -1, None]  # (weak reference, version, segments) of the last position_ids asked about


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Return, per row, the (start, end) of each example: a new one starts wherever position_ids is 0 (and at 0).

    Every layer of a forward asks about the same tensor: the answer is kept while that tensor lives unchanged.
    """
    if _LAST[0] is not None and _LAST[0]() is position_ids and _LAST[1] == position_ids._version:
        return _LAST[2]
    out = []
    for row in position_ids.tolist():
        starts = [0] + [i for i, p in enumerate(row) if p == 0 and i > 0]
        out.append(list(zip(starts, starts[1:] + [len(row)])))
    _LAST[:] = [weakref.ref(position_ids), position_ids._version, out]  # one .tolist() (a GPU sync) per forward
    return out


SHORT = 256
"""Rows whose examples average at most this many tokens may run their attention in fp32 (see short_in_fp32)."""


@functools.lru_cache(maxsize=None)
def short_in_fp32() -> bool:
    """Return whether this CPU runs a short causal attention (forward and backward) faster in fp32 than in bf16.

    Measured once per process (about 0.1 s): torch's CPU flash-attention backward in bf16 was 2-4x slower
    than in fp32 for 48-96-token examples on a Xeon with AMX (docs/benchmarks.md), which made it a quarter
    of a LoRA step; for 512 tokens bf16 won. Machines differ, so this asks the one at hand.
    """
    def seconds(dtype) -> float:
        q, k, v = (torch.randn(1, h, 96, 64, dtype=dtype, requires_grad=True) for h in (8, 4, 4))
        grad = torch.randn(1, 8, 96, 64, dtype=dtype)
        best = float("inf")
        for _ in range(8):
            started = time.perf_counter()
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(grad)
            best = min(best, time.perf_counter() - started)
        return best

    with torch.enable_grad():
        return seconds(torch.float32) < seconds(torch.bfloat16)


@torch.compiler.disable  # the split depends on the batch's data: eager between compiled graphs (train.compile)
def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                **kwargs):
    """Return (attention output as (batch, length, heads, head dim), None), computed example by example."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if not module.training or position_ids is None or query.shape[2] != key.shape[2] or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    spans_per_row = segments(position_ids)
    if len(spans_per_row) == 1:  # one position row shared by the whole batch
        spans_per_row = spans_per_row * query.shape[0]
    rows = [row_attention(q, k, v, spans, scaling)
            for q, k, v, spans in zip(query.unbind(0), key.unbind(0), value.unbind(0), spans_per_row)]
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def row_attention(query, key, value, spans: list[tuple[int, int]], scaling) -> torch.Tensor:
    """Return one packed row's attention, (heads, length, head dim), each example attending causally within itself."""
    # split, not slicing: a slice's backward writes a zero tensor the size of the row for every example.
    lengths = [end - start for start, end in spans]
    dtype = query.dtype
    if dtype == torch.bfloat16 and query.device.type == "cpu" and query.shape[1] <= SHORT * len(spans) and short_in_fp32():
        query, key, value = query.float(), key.float(), value.float()
    parts = [torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scaling,
                                                              enable_gqa=q.shape[0] != k.shape[0])[0]
             for q, k, v in zip(query.split(lengths, 1), key.split(lengths, 1), value.split(lengths, 1))]
    out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return out.to(dtype)


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
