"""Packed rows (several examples per row, a block mask each) give every method the logits of each example alone."""
from __future__ import annotations

import pytest
import torch

from peftkit.data.packing import Collator
from peftkit.methods import MethodError, build_method
from method_helpers import ALL_METHODS, load_tiny, method_config

FIRST, SECOND = list(range(100, 107)), list(range(200, 211))


def alone(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -len(ids):]


@pytest.mark.parametrize("name", ALL_METHODS)
def test_packed_row_equals_each_example_alone(name, tiny_model_dir):
    torch.manual_seed(0)
    model = build_method(load_tiny(tiny_model_dir, name), method_config(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape).to(p.dtype) * 0.05)
    row = {"input_ids": FIRST + SECOND, "labels": [-100] + FIRST[1:] + [-100] + SECOND[1:],
           "position_ids": list(range(len(FIRST))) + list(range(len(SECOND)))}
    batch = Collator(pad_id=0, packing=True, attn_implementation="sdpa")([row])
    with torch.no_grad():
        packed = model(**batch).logits[0, -len(row["input_ids"]):]
    torch.testing.assert_close(packed[:len(FIRST)], alone(model, FIRST), atol=1e-4, rtol=0)
    torch.testing.assert_close(packed[len(FIRST):], alone(model, SECOND), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_flash_style_packing_is_refused_for_virtual_tokens(name, tiny_model_dir):
    model = build_method(load_tiny(tiny_model_dir, name), method_config(name))
    ids = torch.tensor([FIRST + SECOND])
    positions = torch.tensor([list(range(len(FIRST))) + list(range(len(SECOND)))])
    with pytest.raises(MethodError, match="data.packing=false"):
        model(input_ids=ids, position_ids=positions, labels=ids)
