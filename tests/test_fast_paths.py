"""The training fast paths compute what the stock paths compute: chunked loss, per-example attention, byte dropout."""
from __future__ import annotations

import pytest
import torch

from peftkit.chunked_loss import linear_cross_entropy
from peftkit.data.packing import Collator
from peftkit.methods.dropout import ByteMaskDropout, use_byte_dropout
from peftkit.packed_attention import packed_attention, segments


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_chunked_loss_equals_the_stock_loss_and_gradients(monkeypatch, dtype, atol, weight_grad):
    from peftkit import chunked_loss

    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * 5000 * 64)  # 64-row chunks: several per call
    torch.manual_seed(0)
    hidden = torch.randn(300, 32).to(dtype).requires_grad_(True)
    weight = (torch.randn(5000, 32) * 0.2).to(dtype).requires_grad_(weight_grad)
    targets = torch.randint(0, 5000, (300,))
    stock = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), targets, reduction="sum")
    (2 * stock).backward()  # a non-unit upstream gradient must scale both
    grads = [hidden.grad.clone()] + ([weight.grad.clone()] if weight_grad else [])
    hidden.grad = weight.grad = None
    chunked = linear_cross_entropy(hidden, weight, targets)
    (2 * chunked).backward()
    assert torch.allclose(chunked, stock, rtol=1e-5)
    assert torch.allclose(hidden.grad.float(), grads[0].float(), atol=atol)
    if weight_grad:
        assert weight.grad.dtype == dtype and torch.allclose(weight.grad.float(), grads[1].float(), atol=atol * 10)
    else:
        assert weight.grad is None


def test_segments_follow_position_resets():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert segments(pos) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    assert segments(pos) is segments(pos)  # asked again by every layer: computed once
    pos[1, 3] = 0  # changed in place: computed again
    assert segments(pos)[1] == [(0, 3), (3, 6)]
    assert segments(torch.tensor([[0, 1, 0, 1]])) == [[(0, 2), (2, 4)]]  # another tensor, another answer


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
def test_packed_attention_equals_the_block_mask_in_training(kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=300, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).train()
    rows = [{"input_ids": list(range(5, 25)), "labels": list(range(5, 25)), "position_ids": [*range(8), *range(12)]},
            {"input_ids": list(range(30, 45)), "labels": list(range(30, 45)), "position_ids": list(range(15))}]
    batch = {k: v for k, v in Collator(0, packing=True)(rows).items() if k != "labels"}
    results = []
    for packed in (False, True):
        model.zero_grad()
        calls = []
        from peftkit import packed_attention as module

        original = module.segments
        module.segments = lambda p: calls.append(1) or original(p)
        try:
            with packed_attention(model, packed):
                logits = model(**batch).logits
        finally:
            module.segments = original
        logits.float().pow(2).mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()], len(calls)))
    (block, block_grads, block_calls), (split, split_grads, split_calls) = results
    assert block_calls == 0 and split_calls == 2  # the per-example path ran in both layers
    assert torch.allclose(block, split, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(block_grads, split_grads))
    assert model.config._attn_implementation == "sdpa"  # restored after training


def test_packed_attention_leaves_evaluation_to_sdpa():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, vocab_size=100, attn_implementation="sdpa")).eval()
    ids = torch.randint(0, 100, (2, 9))
    plain = model(input_ids=ids).logits
    with packed_attention(model, True):
        assert torch.equal(model(input_ids=ids).logits, plain)


def test_byte_dropout_is_inverted_dropout_with_p_rounded_to_a_256th():
    torch.manual_seed(0)
    drop = ByteMaskDropout(0.05)
    assert drop.cut == 13 and drop.p == 13 / 256
    x = torch.ones(400, 1000)
    out = drop.train()(x)
    dropped = float((out == 0).float().mean())
    assert abs(dropped - 13 / 256) < 0.003  # 400k draws
    assert torch.allclose(out[out != 0], torch.tensor(256 / 243))  # survivors scaled to keep the mean
    assert abs(float(out.mean()) - 1) < 0.01
    assert torch.equal(drop.eval()(x), x)
    torch.manual_seed(1)
    a = ByteMaskDropout(0.1).train()(x)
    torch.manual_seed(1)
    assert torch.equal(ByteMaskDropout(0.1).train()(x), a)  # seeded like torch's own dropout


def test_lora_builds_with_byte_dropout(tiny_model_dir):
    from peftkit.config import MethodConfig
    from peftkit.methods import build_method
    from peftkit.models import load_base

    model = build_method(load_base(str(tiny_model_dir), dtype="fp32"), MethodConfig(name="lora", rank=4, dropout=0.05))
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(isinstance(d, ByteMaskDropout) for d in drops)
    assert use_byte_dropout(model) == 0  # already replaced
