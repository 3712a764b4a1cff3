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


@pytest.mark.parametrize("fp32_faster", [False, True])
def test_packed_attention_in_bf16_matches_the_block_mask_whichever_dtype_the_probe_picks(monkeypatch, fp32_faster):
    """bf16 rows run in bf16 or, where the probe finds fp32 faster for short examples, in fp32: same answer and gradients."""
    from peftkit import packed_attention as module

    monkeypatch.setattr(module, "short_in_fp32", lambda: fp32_faster)
    torch.manual_seed(0)
    lengths = [7, 30, 11, 16]
    q, k, v = (torch.randn(2, heads, 64, 16, dtype=torch.bfloat16, requires_grad=True) for heads in (4, 2, 2))
    position_ids = torch.tensor([[p for n in lengths for p in range(n)], list(range(64))])
    block = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    start = 0
    for n in lengths:
        block[0, 0, start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    block[1, 0] = torch.ones(64, 64, dtype=torch.bool).tril()
    grad = torch.randn(2, 64, 4, 16, dtype=torch.bfloat16)
    outputs = []
    for split in (False, True):
        if split:
            out, _ = module.packed_sdpa(torch.nn.Module().train(), q, k, v, None, scaling=0.25, position_ids=position_ids)
            assert out.dtype == torch.bfloat16  # the model's dtype, whatever ran inside
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=block, scale=0.25, enable_gqa=True).transpose(1, 2)
        out.float().backward(grad.float())
        outputs.append((out.float(), [t.grad.float().clone() for t in (q, k, v)]))
        for t in (q, k, v):
            t.grad = None
    (reference, reference_grads), (split_out, split_grads) = outputs
    assert torch.allclose(split_out, reference, atol=2e-2)
    assert all(torch.allclose(a, b, atol=5e-2) for a, b in zip(split_grads, reference_grads))


def test_the_short_attention_probe_answers_for_this_machine():
    from peftkit.packed_attention import short_in_fp32

    short_in_fp32.cache_clear()
    assert short_in_fp32() in (True, False) and short_in_fp32.cache_info().hits == 0
    assert short_in_fp32() is short_in_fp32() and short_in_fp32.cache_info().hits >= 1  # measured once per process


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


def test_random_bytes_are_uniform_and_seeded():
    from peftkit.methods.dropout import random_bytes

    torch.manual_seed(0)
    drawn = random_bytes(torch.Size([3, 257, 1037]), torch.device("cpu"))  # not a multiple of 8
    assert drawn.shape == (3, 257, 1037) and drawn.dtype == torch.uint8
    counts = torch.bincount(drawn.flatten().long(), minlength=256).float()
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()  # ~3,100 draws per value
    torch.manual_seed(0)
    assert torch.equal(random_bytes(torch.Size([3, 257, 1037]), torch.device("cpu")), drawn)


def test_lora_builds_with_byte_dropout(tiny_model_dir):
    from peftkit.config import MethodConfig
    from peftkit.methods import build_method
    from peftkit.models import load_base

    model = build_method(load_base(str(tiny_model_dir), dtype="fp32"), MethodConfig(name="lora", rank=4, dropout=0.05))
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(isinstance(d, ByteMaskDropout) for d in drops)
    assert use_byte_dropout(model) == 0  # already replaced


def test_compiled_training_matches_eager_and_reports_compile_time(tiny_overrides, tmp_path, peftkit_home, monkeypatch):
    """train.compile gives the eager run's losses and weights (packed rows, dropout off), and says what compiling cost."""
    import json

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # recorded so teardown removes what compiling sets
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")

    from safetensors.torch import load_file

    from peftkit.config import load_config
    from peftkit.train import train

    runs = {}
    for compiled in (False, True):
        overrides = [*tiny_overrides, "data.packing=true", "method.dropout=0", "train.max_steps=3",
                     f"train.output_dir={tmp_path / str(compiled)}", f"train.compile={str(compiled).lower()}"]
        result = train(load_config("configs/demo/fernhill.yaml", overrides))
        runs[compiled] = (json.loads((result.output_dir / "metrics.json").read_text()),
                          load_file(result.adapter_dir / "adapter_model.safetensors"))
    (eager, eager_weights), (fast, fast_weights) = runs[False], runs[True]
    assert eager["compile_time_s"] is None and fast["compile_time_s"] > 0
    assert fast["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert fast["eval_loss"] == pytest.approx(eager["eval_loss"], rel=1e-4)
    assert fast_weights.keys() == eager_weights.keys()  # compiling leaves the saved names alone
    for name, weight in eager_weights.items():
        assert torch.allclose(fast_weights[name], weight, atol=1e-5), name
    assert any((peftkit_home / "compile-cache").iterdir())  # compiled code kept for the next run


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_forward_in_the_base_dtype_matches_peft(dtype, dropout):
    """The mixed-precision LoRA forward: fp32 is peft's own (bit for bit); bf16 is peft's within bf16 rounding, fp32 grads."""
    from peft.tuners.lora import Linear
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit.config import MethodConfig
    from peftkit.methods import build_method

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=300)).to(dtype)
    model = build_method(base, MethodConfig(name="lora", rank=8, alpha=16, dropout=dropout, target_modules="all-linear"))
    model.train()  # dropout on: the same seed draws the same masks on both paths
    layers = [m for m in model.modules() if type(m) is Linear]
    assert layers and all("forward" in vars(m) for m in layers)  # every LoRA layer got the fast forward
    for m in layers:
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)  # B starts at zero: make the update count
    ids = torch.randint(0, 300, (2, 12))
    results = []
    for fast in (True, False):
        saved = {m: vars(m).pop("forward") for m in layers} if not fast else {}
        model.zero_grad()
        torch.manual_seed(1)
        logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        grads = [(m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad) for m in layers]
        results.append((logits.detach().float(), grads))
        for m, forward in saved.items():
            m.forward = forward
    (fast_logits, fast_grads), (peft_logits, peft_grads) = results
    assert all(a.dtype == torch.float32 and b.dtype == torch.float32 for a, b in fast_grads)  # fp32 master weights
    if dtype == torch.float32:
        assert torch.equal(fast_logits, peft_logits)
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(fast_grads, peft_grads))
    else:
        assert (fast_logits - peft_logits).abs().max() <= 0.05 * peft_logits.abs().max()
        for (a, b), (c, d) in zip(fast_grads, peft_grads):
            assert torch.allclose(a, c, atol=0.05 * c.abs().max()) and torch.allclose(b, d, atol=0.05 * d.abs().max())
