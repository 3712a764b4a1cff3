"""The contract every method keeps, on a tiny random Llama: save/load, disable, training, generation."""
from __future__ import annotations

import pytest
import torch

from peftkit.methods import MethodError, build_method, load_adapter
from method_helpers import ALL_METHODS, load_tiny, method_config

# What a freshly built adapter does to the base's logits: LoRA (B=0), IA3 (ones), bottleneck
# (zero up-projection) and full (untouched weights) change nothing; virtual tokens change everything.
FRESH_CHANGES_LOGITS = {"prefix", "prompt"}
# Learning rates that move each method within ten steps on one batch.
LEARNING_RATE = {"prefix": 3e-2, "prompt": 3e-1, "ia3": 3e-2, "full": 3e-3}


def logits(model, batch) -> torch.Tensor:
    """Return the logits for the batch's own tokens (prompt tuning also returns its virtual positions)."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out[:, -batch["input_ids"].shape[1]:]


def nudge(model, seed: int = 1) -> None:
    """Move every trainable weight a little, as training would, so the adapter is not a no-op."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.05)


def base_and_logits(tiny_model_dir, name, batch):
    """Return the base model as the method loads it, and its logits on the batch."""
    torch.manual_seed(0)
    base = load_tiny(tiny_model_dir, name)
    return base, logits(base.eval(), batch)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_save_then_load_gives_identical_logits(name, tiny_model_dir, batch, tmp_path):
    base, _ = base_and_logits(tiny_model_dir, name, batch)
    model = build_method(base, method_config(name)).eval()
    nudge(model)
    before = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    # Adapters: adapter_config.json; full fine-tuning: the whole model, as transformers saves it.
    assert (tmp_path / "adapter" / ("config.json" if name == "full" else "adapter_config.json")).is_file()
    assert list((tmp_path / "adapter").glob("*.safetensors")), "weights must be saved as safetensors"
    assert not list((tmp_path / "adapter").glob("*.bin")), "no pickle files"

    reloaded = load_adapter(load_tiny(tiny_model_dir, name), tmp_path / "adapter").eval()
    after = logits(reloaded, batch)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    assert not torch.allclose(after, logits(load_tiny(tiny_model_dir, name).eval(), batch), atol=1e-4), \
        "the reloaded adapter must change the output"


@pytest.mark.parametrize("name", ALL_METHODS)
def test_fresh_adapter_and_disabled_adapter_against_base(name, tiny_model_dir, batch):
    base, base_logits = base_and_logits(tiny_model_dir, name, batch)
    model = build_method(base, method_config(name)).eval()
    fresh = logits(model, batch)
    if name in FRESH_CHANGES_LOGITS:
        assert (fresh - base_logits).abs().max() > 1e-3, f"{name}: fresh virtual tokens must change the output"
    else:
        torch.testing.assert_close(fresh, base_logits, atol=1e-6, rtol=0)

    if name == "full":
        pytest.skip("full fine-tuning replaces the base weights: there is no adapter to disable")
    nudge(model)
    assert (logits(model, batch) - base_logits).abs().max() > 1e-4
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), base_logits, atol=1e-6, rtol=0)
    assert (logits(model, batch) - base_logits).abs().max() > 1e-4, "leaving the block must re-enable the adapter"


def test_full_fine_tune_refuses_to_disable(tiny_model_dir):
    model = build_method(load_tiny(tiny_model_dir, "full"), method_config("full"))
    with pytest.raises(MethodError, match="no adapter to disable"):
        with model.disable_adapter():
            pass


@pytest.mark.parametrize("name", ALL_METHODS)
def test_ten_steps_lower_the_loss_and_train_only_the_method(name, tiny_model_dir, batch):
    base, _ = base_and_logits(tiny_model_dir, name, batch)
    model = build_method(base, method_config(name))
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    share = sum(p.numel() for p in trainable) / total
    assert share == 1.0 if name == "full" else 0 < share < 0.01, f"{name} trains {share:.2%} of the parameters"

    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE.get(name, 1e-2))
    model.train()
    losses = []
    for _ in range(10):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("name", ALL_METHODS)
def test_generate_uses_the_adapter_with_left_padding(name, tiny_model_dir, batch, tokenizer):
    base, _ = base_and_logits(tiny_model_dir, name, batch)
    model = build_method(base, method_config(name)).eval()
    nudge(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        padded = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        short = int(mask[0].sum())
        alone = model.generate(input_ids=ids[:1, -short:], attention_mask=mask[:1, -short:], **kwargs)
    assert padded.sequences.shape[1] > ids.shape[1], "no token generated"
    assert torch.equal(padded.sequences[:, :ids.shape[1]], ids), "the output must start with the prompt"
    # The first generated token sees the adapter exactly as the training forward pass does
    # (row 1 is unpadded; training batches are right-padded)...
    torch.testing.assert_close(padded.scores[0][1], logits(model, batch)[1, -1], atol=1e-4, rtol=0)
    # ...and left padding changes nothing for the padded row 0.
    torch.testing.assert_close(padded.scores[0][:1], alone.scores[0], atol=1e-4, rtol=0)
