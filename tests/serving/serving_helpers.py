"""Helpers shared by the serving tests: adapters with random weights and request builders."""
from __future__ import annotations

from pathlib import Path

LORA_NAMES = [f"lora{i}" for i in range(9)]


def make_adapter(base_dir: Path, out: Path, seed: int, **config) -> Path:
    """Save a peft adapter for the model in base_dir with random weights; config goes to its peft config."""
    import torch
    from peft import IA3Config, LoHaConfig, LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    kind = config.pop("kind", "lora")
    model = LlamaForCausalLM.from_pretrained(base_dir)
    if kind == "ia3":
        peft_config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    elif kind == "loha":
        peft_config = LoHaConfig(r=4, target_modules=["q_proj", "v_proj"])
    else:
        peft_config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"], **config})
    peft_model = get_peft_model(model, peft_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "ia3_" in name or "hada_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5 + (1.0 if "ia3_" in name else 0.0))
    peft_model.save_pretrained(out)
    return out


def chat(model: str, content: str = "What colour is item 3?", max_tokens: int = 8, **kwargs):
    """Return a GenerationRequest for one user message."""
    from peftkit.serving.engine import GenerationRequest

    return GenerationRequest(model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                             temperature=kwargs.pop("temperature", 0.0), **kwargs)


def make_method_adapter(base_dir: Path, out: Path, method: str, seed: int, **fields) -> Path:
    """Save a peftkit adapter of any method (prefix, prompt, bottleneck, full, ...) with random, non-trivial weights."""
    from peftkit.bench.serve_load import random_method_adapter

    return random_method_adapter(base_dir, out, method, seed, scale=0.02 if method == "full" else 0.5,
                                 **{"num_virtual_tokens": 5, "reduction_factor": 8, **fields})


def make_other_base(tiny_dir: Path, out: Path) -> Path:
    """Save a 2-layer Llama whose hidden size (32) differs from the tiny base's (64), with the same tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def writable_copy(folder: Path, out: Path) -> Path:
    """Return a writable copy of a (read-only) registry checkout."""
    import shutil

    shutil.copytree(folder, out)
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out


def remove_checkout(folder: Path) -> None:
    """Delete a read-only registry checkout folder, as `registry remove` does."""
    import shutil

    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(folder)
