"""Exact parameter counts and adapter sizes: hand-computed on Llama 3.1 8B, checked against real saves on the tiny Llama."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from peftkit.compare import preset_method
from peftkit.methods import build_method
from peftkit.methods.footprint import llama31_8b_config, measure
from method_helpers import ALL_METHODS, load_tiny, method_config

# Llama 3.1 8B: hidden 4096, MLP 14336, 32 layers, 8 key/value heads of 128 -> k/v width 1024.
H, I, L, KV, VOCAB = 4096, 14336, 32, 1024, 128256
# (in, out) of each linear layer in one decoder layer.
LINEARS = {"q_proj": (H, H), "k_proj": (H, KV), "v_proj": (H, KV), "o_proj": (H, H),
           "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}


def lora_params(rank: int) -> int:
    # Each adapted layer gets A (in x r) and B (r x out): r * (in + out) per layer, every layer.
    return L * sum(rank * (i + o) for i, o in LINEARS.values())


def test_llama_8b_has_its_published_size():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama31_8b_config())
    per_layer = sum(i * o for i, o in LINEARS.values()) + 2 * H  # 7 projections + 2 RMSNorms
    assert sum(p.numel() for p in model.parameters()) == L * per_layer + 2 * VOCAB * H + H == 8_030_261_248


def test_lora_rank_16_all_linear_on_8b_is_exact():
    assert lora_params(16) == 32 * (16 * (4096 + 4096) * 2 + 16 * (4096 + 1024) * 2 + 16 * (4096 + 14336) * 3) == 41_943_040
    f = measure(preset_method("lora"))  # configs/llama-3.1-8b/lora.yaml: rank 16, all-linear
    assert (f.trainable, f.saved_bytes, f.saved_dtypes) == (41_943_040, 41_943_040 * 4, "float32")
    assert f.base_parameters == 8_030_261_248 and f.base_bytes == 8_030_261_248 * 2  # bf16 base


def test_qlora_rank_64_adapter_is_four_times_lora_16_and_base_shrinks():
    f = measure(preset_method("qlora"))  # configs/llama-3.1-8b/qlora.yaml: rank 64, all-linear
    assert (f.trainable, f.saved_bytes) == (lora_params(64), lora_params(64) * 4) == (167_772_160, 671_088_640)
    # NF4: decoder linears at 4 bits + 1 byte absmax per 64 + fp32 per 256 absmaxes; embeddings, lm_head, norms stay bf16.
    quantized = L * sum(i * o for i, o in LINEARS.values())
    blocks_per_layer = [i * o // 64 for i, o in LINEARS.values()]
    nf4 = quantized // 2 + L * sum(b + 4 * -(-b // 256) for b in blocks_per_layer)
    assert f.base_bytes == nf4 + (2 * VOCAB * H + (2 * L + 1) * H) * 2
    assert 5.6e9 < f.base_bytes < 5.8e9


@pytest.mark.parametrize("method, expected", [
    ("prefix", 20 * L * 2 * KV),                    # 20 virtual tokens x (key + value) x k/v width, every layer
    ("prompt", 20 * H),                             # 20 virtual token embeddings
    ("ia3", L * (H + KV + KV + H + I + I + I)),     # all-linear preset: one vector per output (down_proj: per input)
    ("dora", lora_params(16) + L * (H + KV + KV + H + I + I + H)),  # LoRA + one magnitude per output row
    ("bottleneck", L * 2 * (H * 256 + 256 + 256 * H + H)),          # width 4096/16 = 256, after attention and MLP
    ("full", 8_030_261_248),
])
def test_other_methods_on_8b_are_exact(method, expected):
    f = measure(preset_method(method))
    assert f.trainable == expected
    assert f.saved_bytes == expected * (2 if method == "full" else 4)  # full saves bf16 weights, adapters fp32


@pytest.mark.parametrize("name", ALL_METHODS)
def test_measure_matches_a_real_build_and_save(name, tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    cfg = method_config(name)
    model = build_method(load_tiny(tiny_model_dir, name), cfg)
    model.save_pretrained(tmp_path, safe_serialization=True)
    saved = 0
    for file in tmp_path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                saved += _numel(tensor.get_shape()) * ITEMSIZE[tensor.get_dtype()]
    predicted = measure(cfg, AutoConfig.from_pretrained(tiny_model_dir), dtype=torch.float32)
    assert predicted.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert predicted.saved_bytes == saved


ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "U8": 1, "I64": 8}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


