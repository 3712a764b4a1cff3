"""Fixtures for merge, export and mix: tiny-model adapters with nudged (non-zero) weights, saved as training saves them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))  # method_helpers

SYSTEM = "You are the support assistant of a small shop."


def nudge(model, seed: int) -> None:
    """Move every trainable weight off its initial value, so an adapter that is not merged shows in the logits."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen).to(p.dtype)
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * noise)          # IA3 scales start at 1
            elif "magnitude" in name:
                p.mul_(1 + 0.2 * noise)           # DoRA magnitudes start at the weight norms
            else:
                p.copy_(0.2 * noise)              # LoRA A and B (B starts at zero)


def save_adapter(model, tokenizer, folder: Path, method: str, base_dir: Path, system: str | None = SYSTEM) -> Path:
    """Write the adapter, tokenizer and lineage as peftkit train does; return folder."""
    from peftkit.fingerprint import base_fingerprint
    from peftkit.prompting import build_prompting

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lineage = {"method": method, "base_model": str(base_dir), "base_fingerprint": base_fingerprint(base_dir),
               "prompting": build_prompting(tokenizer, system, None).to_dict(), "config": {}, "metrics": {}}
    (folder / "peftkit.json").write_text(json.dumps(lineage), encoding="utf-8")
    return folder


@pytest.fixture
def make_adapter(tiny_model_dir, tokenizer, tmp_path):
    """Return a function building a nudged tiny-model adapter folder for a method (fields override the config)."""
    from method_helpers import load_tiny, method_config

    from peftkit.methods import build_method

    def make(method: str, seed: int = 0, name: str | None = None, system: str | None = SYSTEM, **fields) -> Path:
        model = build_method(load_tiny(tiny_model_dir, method), method_config(method, **fields))
        nudge(model, seed)
        folder = tmp_path / (name or f"{method}-{seed}")
        return save_adapter(model, tokenizer, folder, method, tiny_model_dir, system)

    return make
