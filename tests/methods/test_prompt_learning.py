"""How prefix and prompt tuning start: from real token activations and embeddings, not from noise."""
from __future__ import annotations

import torch

from peftkit.methods import build_method
from method_helpers import load_tiny, method_config


def test_prefix_starts_as_the_cache_of_real_tokens(tiny_model_dir, batch):
    # A prefix equal to the keys and values of n real tokens must act exactly like those tokens in front of the input.
    torch.manual_seed(3)
    model = build_method(load_tiny(tiny_model_dir, "prefix"), method_config("prefix")).eval()
    torch.manual_seed(3)
    n = model.active_peft_config.num_virtual_tokens
    ids = torch.randint(0, model.config.vocab_size, (1, n))  # the same draw the builder made
    text = batch["input_ids"][1:]  # the unpadded row
    with torch.no_grad():
        with_prefix = model(input_ids=text).logits
        with model.disable_adapter():
            spelled_out = model(input_ids=torch.cat([ids, text], dim=1)).logits[:, n:]
    torch.testing.assert_close(with_prefix, spelled_out, atol=1e-4, rtol=0)


def test_prompt_tuning_starts_from_vocabulary_embeddings(tiny_model_dir):
    model = build_method(load_tiny(tiny_model_dir, "prompt"), method_config("prompt"))
    learned = model.prompt_encoder["default"].embedding.weight
    words = model.get_base_model().get_input_embeddings().weight
    assert all(any(torch.equal(row, w) for w in words) for row in learned)  # each row is some token's embedding
