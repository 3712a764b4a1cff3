"""Fixtures for the method tests: a fixed, left-padded batch (helpers live in method_helpers.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def batch(tokenizer):
    """Return a fixed left-padded batch of two chat-like texts: input_ids, attention_mask, labels."""
    import torch

    texts = ["Item 3 is green.", "What colour is item 12? Item 12 is black."]
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
