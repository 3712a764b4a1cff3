"""LoRA's options as users set them: target presets, rsLoRA scaling, DoRA magnitudes."""
from __future__ import annotations

import math

import pytest

from peftkit.methods import build_method
from method_helpers import load_tiny, method_config


def adapted(model) -> set[str]:
    """Return the short names of the layers that got LoRA weights."""
    return {name.split(".")[-4] for name, _ in model.named_parameters() if name.endswith("lora_A.default.weight")}


@pytest.mark.parametrize("targets, expected", [
    ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
])
def test_target_presets_and_lists(targets, expected, tiny_model_dir):
    model = build_method(load_tiny(tiny_model_dir, "lora"), method_config("lora", target_modules=targets))
    assert adapted(model) == expected


def test_rslora_scales_by_alpha_over_sqrt_rank(tiny_model_dir):
    plain = build_method(load_tiny(tiny_model_dir, "lora"), method_config("lora", rank=4, alpha=8.0))
    rs = build_method(load_tiny(tiny_model_dir, "lora"), method_config("lora", rank=4, alpha=8.0, use_rslora=True))
    layer = lambda m: m.base_model.model.model.layers[0].self_attn.q_proj  # noqa: E731
    assert layer(plain).scaling["default"] == 8.0 / 4
    assert layer(rs).scaling["default"] == 8.0 / math.sqrt(4)


@pytest.mark.parametrize("how", ["lora+use_dora", "dora"])
def test_dora_adds_one_magnitude_per_output_row(how, tiny_model_dir):
    name, _, flag = how.partition("+")
    model = build_method(load_tiny(tiny_model_dir, name), method_config(name, use_dora=bool(flag)))
    magnitudes = {n: p.numel() for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    # attention preset, 2 layers: q and o have 64 outputs, k and v have 32 (2 key/value heads of 16).
    assert len(magnitudes) == 8 and sum(magnitudes.values()) == 2 * (64 + 32 + 32 + 64)
