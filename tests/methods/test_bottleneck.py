"""Bottleneck adapters, our own module: what they save, where they sit, and how they come off."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from peftkit.methods import MethodError, build_method, load_adapter
from method_helpers import load_tiny, method_config


def test_saved_folder_describes_the_adapter(tiny_model_dir, tmp_path):
    model = build_method(load_tiny(tiny_model_dir, "bottleneck"), method_config("bottleneck", reduction_factor=16))
    model.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTKIT_BOTTLENECK"
    assert (config["reduction_factor"], config["placement"], config["hidden_size"], config["num_layers"],
            config["bottleneck_size"], config["activation"]) == (16, "both", 64, 2, 4, "relu")
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    # 2 layers x (attention, mlp) x down (4x64 + 4) and up (64x4 + 64); nothing of the base.
    assert len(shapes) == 16 and shapes["layers.1.mlp.down.weight"] == (4, 64) and shapes["layers.0.attention.up.weight"] == (64, 4)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 2 * 2 * (4 * 64 + 4 + 64 * 4 + 64)


def test_pfeiffer_placement_adapts_the_mlp_only(tiny_model_dir):
    model = build_method(load_tiny(tiny_model_dir, "bottleneck"), method_config("bottleneck", adapter_placement="mlp"))
    keys = list(model.state_dict())
    assert keys and all(".mlp." in k for k in keys)


def test_unload_gives_back_the_untouched_base(tiny_model_dir, batch):
    base = load_tiny(tiny_model_dir, "bottleneck").eval()
    with torch.no_grad():
        before = base(input_ids=batch["input_ids"]).logits
    model = build_method(base, method_config("bottleneck"))
    with torch.no_grad():
        for p in model.layers.parameters():
            p.add_(0.1)
        assert not torch.allclose(model(input_ids=batch["input_ids"]).logits, before, atol=1e-4)
        unloaded = model.unload()
        assert unloaded is base
        torch.testing.assert_close(unloaded(input_ids=batch["input_ids"]).logits, before, atol=0, rtol=0)
    assert not any(layer.self_attn._forward_hooks or layer.mlp._forward_hooks for layer in base.model.layers)


def test_load_on_a_different_base_says_which_shape_differs(tiny_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = build_method(load_tiny(tiny_model_dir, "bottleneck"), method_config("bottleneck"))
    model.save_pretrained(tmp_path, safe_serialization=True)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(MethodError, match="2 layers of width 64.*3 of width 64"):
        load_adapter(other, tmp_path)


def test_loaded_for_training_only_the_adapter_trains(tiny_model_dir, tmp_path):
    model = build_method(load_tiny(tiny_model_dir, "bottleneck"), method_config("bottleneck"))
    model.save_pretrained(tmp_path, safe_serialization=True)
    frozen = load_adapter(load_tiny(tiny_model_dir, "bottleneck"), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = load_adapter(load_tiny(tiny_model_dir, "bottleneck"), tmp_path, is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("layers.") for n in names)


def test_refuses_pickle(tiny_model_dir, tmp_path):
    model = build_method(load_tiny(tiny_model_dir, "bottleneck"), method_config("bottleneck"))
    with pytest.raises(MethodError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)
