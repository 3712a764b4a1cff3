"""Fake adapters for registry tests: tiny Llama-shaped safetensors written with numpy (no torch)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# A tiny Llama: head_dim 16, so k/v projections are 2 x 16 = 32 wide.
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
BASE_FP = "sha256:" + "ab" * 32
OTHER_FP = "sha256:" + "cd" * 32
IO = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
      "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
counter = itertools.count()  # unique folder names and seeds across a test session


def lora_tensors(rank: int = 8, modules=("q_proj", "v_proj"), seed: int = 0, layers: int = 2, dora: bool = False) -> dict:
    """Return {name: array} shaped like a peft LoRA adapter for the tiny Llama."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(layers):
        for m in modules:
            n_in, n_out = IO[m]
            block = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{m}"
            out[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, n_in)).astype(np.float32)
            out[f"{prefix}.lora_B.weight"] = rng.standard_normal((n_out, rank)).astype(np.float32)
            if dora:
                out[f"{prefix}.lora_magnitude_vector"] = np.ones(n_out, np.float32)
    return out


def write_adapter(folder: Path, tensors: dict | None = None, *, peft_type: str = "LORA", rank: int = 8, seed: int = 0,
                  lineage: dict | None | bool = True, adapter_config: dict | None = None, extra_files: dict | None = None) -> Path:
    """Return a folder holding adapter_config.json, adapter_model.safetensors and (by default) peftkit.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = lora_tensors(rank=rank, seed=seed) if tensors is None else tensors
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": peft_type, "r": rank, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "tiny-llama", "task_type": "CAUSAL_LM", **(adapter_config or {})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if lineage:
        record = make_lineage(rank=rank, seed=seed)
        record.update(lineage if isinstance(lineage, dict) else {})
        (folder / "peftkit.json").write_text(json.dumps(record))
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    return folder


def make_lineage(rank: int = 8, seed: int = 0) -> dict:
    """Return a peftkit.json record like the one training writes."""
    return {"peftkit_version": "0.1.0", "method": "lora", "base_model": "tiny-llama", "base_fingerprint": BASE_FP,
            "base_config": LLAMA, "data_fingerprint": f"sha256:{seed:064x}", "config": {"method": {"name": "lora", "rank": rank}},
            "metrics": {"eval_loss": 1.25, "train_loss": 1.5}, "parent": None, "created_at": "2025-01-02T03:04:05+00:00"}
