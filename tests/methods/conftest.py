"""Fixtures for the method tests: small method configs, a fixed batch, and base loading by method."""
from __future__ import annotations

import pytest

from peftkit.config import MethodConfig

ALL_METHODS = ("lora", "dora", "qlora", "prefix", "prompt", "ia3", "bottleneck", "full")
# Small sizes keep the tiny model's tests fast; every other field is the config default.
SMALL = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "num_virtual_tokens": 4, "reduction_factor": 8}


def method_config(name: str, **fields) -> MethodConfig:
    """Return a MethodConfig for name with small sizes (fields override them)."""
    return MethodConfig(name=name, **{**SMALL, **fields})


def load_tiny(tiny_model_dir, method: str):
    """Return the tiny Llama as that method's training loads it (4-bit NF4 for qlora, else fp32)."""
    from peftkit.models import load_base

    return load_base(str(tiny_model_dir), dtype="fp32", quantize_4bit=method == "qlora")


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
