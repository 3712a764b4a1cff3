"""Shared fixtures: an isolated PEFTKIT_HOME per test, the bundled tokenizer, a tiny random Llama.

The bundled model is converted once per machine into a shared cache (about 40 s the first
time); every test gets its own PEFTKIT_HOME whose models/ points at that cache, so registry
and data caches never leak between tests.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_HOME = Path(os.environ.get("PEFTKIT_TEST_CACHE", REPO / ".pytest_cache" / "peftkit-home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def peftkit_home(tmp_path_factory, monkeypatch) -> Path:
    """Return a fresh PEFTKIT_HOME for this test, sharing only the converted-model cache."""
    home = tmp_path_factory.mktemp("home")
    (SHARED_HOME / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(SHARED_HOME / "models")
    monkeypatch.setenv("PEFTKIT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """Return the converted bundled SmolLM2-135M-Instruct folder (converted once per machine)."""
    old = os.environ.get("PEFTKIT_HOME")
    os.environ["PEFTKIT_HOME"] = str(SHARED_HOME)
    try:
        from peftkit.models import resolve_model

        return resolve_model("smollm2-135m-instruct")
    finally:
        if old is None:
            os.environ.pop("PEFTKIT_HOME", None)
        else:
            os.environ["PEFTKIT_HOME"] = old


@pytest.fixture(scope="session")
def tokenizer(bundled_dir):
    """Return the bundled model's tokenizer with peftkit's pad policy applied."""
    from transformers import AutoTokenizer

    from peftkit.models import set_pad_token

    tok = AutoTokenizer.from_pretrained(bundled_dir)
    set_pad_token(tok)
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_dir) -> Path:
    """Return a folder with a 2-layer random Llama (hidden 64) and the bundled tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(bundled_dir)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512, initializer_range=0.2,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines and return the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n: int) -> list[dict]:
    """Return n short, learnable support conversations."""
    colours = ["red", "blue", "green", "black", "white", "amber", "violet", "grey"]
    return [{"messages": [{"role": "user", "content": f"What colour is item {i}?"},
                          {"role": "assistant", "content": f"Item {i} is {colours[i % len(colours)]}."}]}
            for i in range(n)]


@pytest.fixture
def chat_file(tmp_path) -> Path:
    """Return a 48-row chat JSONL file."""
    return write_jsonl(tmp_path / "chat.jsonl", chat_rows(48))


@pytest.fixture
def tiny_overrides(tiny_model_dir, chat_file, tmp_path) -> list[str]:
    """Return --set overrides that train the tiny model quickly on chat_file."""
    return [f"model.name={tiny_model_dir}", "model.dtype=fp32", f"data.path={chat_file}", "data.eval_path=null", "data.eval_fraction=0.1",
            "data.max_seq_length=128", "train.max_steps=6", "train.batch_size=4", "train.logging_steps=1",
            "train.save_steps=3", "train.learning_rate=0.005", f"train.output_dir={tmp_path / 'run'}",
            "registry.register=false"]
