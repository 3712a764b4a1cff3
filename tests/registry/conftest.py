"""Fixtures for registry tests: a temp registry and factories of fake adapters, run folders and base models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from peftkit.registry import Registry
from registry_fakes import LLAMA, counter, write_adapter


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    """Return an empty registry in a temp folder."""
    registry = Registry(tmp_path / "registry")
    yield registry
    registry.close()


@pytest.fixture
def make_adapter(tmp_path: Path):
    """Return a factory: make_adapter(seed=..., **write_adapter kwargs) -> a fresh adapter folder."""
    def make(**kwargs) -> Path:
        kwargs.setdefault("seed", next(counter))
        return write_adapter(tmp_path / "src" / f"adapter{next(counter)}", **kwargs)
    return make


@pytest.fixture
def make_run(tmp_path: Path):
    """Return a factory for training run folders: adapter/ + config.yaml + metrics.json (adapter without peftkit.json)."""
    def make(seed: int = 0, lineage: bool = False) -> Path:
        run = tmp_path / "runs" / f"run{next(counter)}"
        write_adapter(run / "adapter", seed=seed, lineage=lineage)
        (run / "config.yaml").write_text(yaml.safe_dump({"name": "run", "method": {"name": "lora", "rank": 8}}))
        (run / "metrics.json").write_text(json.dumps({"eval_loss": 0.75}))
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "junk.safetensors").write_bytes(b"not stored")
        return run
    return make


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """Return a local base model folder (config.json, tokenizer files, one safetensors shard) for the tiny Llama."""
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}, "added_tokens": []}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    rng = np.random.default_rng(0)
    save_file({"model.embed_tokens.weight": rng.standard_normal((512, 64)).astype(np.float32),
               "model.norm.weight": np.ones(64, np.float32)}, str(folder / "model.safetensors"))
    return folder
