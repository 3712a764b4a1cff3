"""Mistakes users make with methods, and the words the errors use to say how to fix them."""
from __future__ import annotations

import pytest
import torch

from peftkit.methods import MethodError, build_method, load_adapter
from method_helpers import load_tiny, method_config


def test_unknown_method_lists_the_choices(tiny_model_dir):
    with pytest.raises(MethodError, match="method.name='loraa' is unknown; choose one of lora, dora, qlora"):
        build_method(load_tiny(tiny_model_dir, "lora"), method_config("loraa"))


def test_qlora_without_a_4bit_base_says_how_to_load_one(tiny_model_dir):
    with pytest.raises(MethodError, match="quantize_4bit=True"):
        build_method(load_tiny(tiny_model_dir, "lora"), method_config("qlora"))


def test_full_refuses_a_4bit_base(tiny_model_dir):
    with pytest.raises(MethodError, match="use method.name=qlora"):
        build_method(load_tiny(tiny_model_dir, "qlora"), method_config("full"))


@pytest.mark.parametrize("name", ["lora", "ia3"])
def test_unknown_target_module_names_the_key_and_the_real_names(name, tiny_model_dir):
    with pytest.raises(MethodError, match=r"method.target_modules=\['q_prj'\].*q_proj, k_proj"):
        build_method(load_tiny(tiny_model_dir, name), method_config(name, target_modules=["q_prj"]))


def test_load_adapter_from_a_folder_without_one(tmp_path):
    with pytest.raises(MethodError, match=r"no adapter_config.json \(nor a full fine-tune's config.json.*pass the adapter folder"):
        load_adapter(None, tmp_path)


def test_prompt_init_text_starts_from_that_texts_embeddings(tiny_model_dir, tokenizer):
    model = build_method(load_tiny(tiny_model_dir, "prompt"), method_config("prompt", prompt_init_text="Answer politely"))
    ids = tokenizer("Answer politely")["input_ids"]
    learned = model.prompt_encoder["default"].embedding.weight
    words = model.get_base_model().get_input_embeddings().weight
    # 4 virtual tokens: the text's tokens, repeated when the text is shorter.
    torch.testing.assert_close(learned, words[(ids * 4)[:4]], atol=0, rtol=0)


def test_prompt_init_text_without_a_tokenizer_says_so(tiny_model_dir):
    base = load_tiny(tiny_model_dir, "prompt")
    base.name_or_path = "/nowhere"
    with pytest.raises(MethodError, match="prompt_init_text needs the base model's tokenizer"):
        build_method(base, method_config("prompt", prompt_init_text="Answer politely"))


def test_full_fine_tune_folder_on_the_wrong_base(tiny_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    build_method(load_tiny(tiny_model_dir, "full"), method_config("full")).save_pretrained(tmp_path)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=49152))
    with pytest.raises(MethodError, match="does not fit this base model.*missing.*layers.2"):
        load_adapter(other, tmp_path)
