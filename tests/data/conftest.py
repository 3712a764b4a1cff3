"""Data-test fixtures: tokenizers with real chat templates (SmolLM2, Llama 3.1, Mistral) and file writers.

The shared `tokenizer` fixture (tests/conftest.py) is the bundled SmolLM2 tokenizer with peftkit's pad
policy; `raw_tokenizer` is the same tokenizer as shipped, whose pad token is its end-of-turn token
<|im_end|>, the case where masking by pad id would silently stop the model learning to stop.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]


@pytest.fixture(scope="session")
def raw_tokenizer(bundled_dir):
    """Return the bundled SmolLM2 tokenizer as shipped (pad token = EOS = <|im_end|>)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_dir)


@pytest.fixture(scope="session")
def llama3_tokenizer(bundled_dir):
    """Return a tokenizer with Llama 3.1's special tokens and its real Instruct chat template.

    EOS is <|end_of_text|> (as in the base model), so tests can tell the template's end-of-turn
    token <|eot_id|> apart from EOS.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_dir)
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL})
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
    tok.chat_template = (FIXTURES / "llama-3.1-instruct.jinja").read_text(encoding="utf-8")
    return tok


@pytest.fixture(scope="session")
def mistral_template() -> str:
    """Return Mistral-7B-Instruct-v0.1's chat template, which demands user/assistant alternation."""
    return (FIXTURES / "mistral-7b-instruct-v0.1.jinja").read_text(encoding="utf-8")


@pytest.fixture
def write(tmp_path):
    """Return a function writing rows (JSON lines), text or bytes to tmp_path/name and returning its path."""
    def _write(name: str, content) -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in content), encoding="utf-8")
        return path
    return _write

