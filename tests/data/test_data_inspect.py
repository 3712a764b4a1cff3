"""`peftkit data inspect`: counts, a length histogram and examples with the trained tokens marked."""
from __future__ import annotations

import sys
import types

from data_helpers import chat

from peftkit.cli import main
from peftkit.data import prepare
from peftkit.data.report import build_report, histogram
from peftkit.config import DataConfig


def test_report_shows_counts_histogram_and_marked_examples(write, tokenizer):
    path = write("train.jsonl", [chat("Hi", "Hello!", "Bye", "See you."), chat("Long " * 80, "Cut")])
    prepared = prepare(DataConfig(path=str(path), eval_fraction=0.0, max_seq_length=64, packing=True), tokenizer,
                       progress=False)
    report = build_report(prepared, tokenizer, n=1)
    assert f"{path}  format=chat weight=1  rows=2 train=2 eval=0 examples=1" in report
    assert "truncated 1, dropped 0, fully masked 1" in report and "packed into 1 sequences" in report
    assert "example lengths in tokens (train, limit 64, policy truncate)" in report
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello!<|im_end|>]]\n<|im_start|>user\nBye" in report
    assert "[[See you.<|im_end|>]]" in report
    coloured = build_report(prepared, tokenizer, n=1, color=True)
    assert "\x1b[1;32mHello!<|im_end|>\x1b[0m" in coloured and "[[" not in coloured


def test_histogram_counts_each_length_once():
    rows = histogram([1, 10, 16, 17, 64], limit=64, bins=4, width=4)
    assert [r.split()[-1] for r in rows] == ["3", "1", "0", "1"]
    assert rows[0].split()[0] == "1-16" and rows[-1].split()[0] == "49-64"


def test_cli_prints_the_report(write, tokenizer, tmp_path, monkeypatch, capsys):
    path = write("train.jsonl", [chat("Ping?", "Pong.")])
    config = write("run.yaml", f"data:\n  path: {path}\n  eval_fraction: 0\n")
    seen = {}

    def load_tokenizer(name, revision=None, offline=False):
        seen["name"] = name
        return tokenizer

    monkeypatch.setitem(sys.modules, "peftkit.models", types.SimpleNamespace(load_tokenizer=load_tokenizer))
    code = main(["data", "inspect", str(config), "--set", "model.name=my-model", "--set", "data.max_seq_length=99",
                 "-n", "1", "--color", "never"])
    out = capsys.readouterr().out
    assert code == 0 and seen["name"] == "my-model"
    assert "limit 99" in out and "[[Pong.<|im_end|>]]" in out and "--- example 1:" in out


def test_cli_bad_data_is_one_line_error(write, tokenizer, monkeypatch, capsys):
    path = write("train.jsonl", [{"messages": "oops"}])
    config = write("run.yaml", f"data:\n  path: {path}\n")
    monkeypatch.setitem(sys.modules, "peftkit.models", types.SimpleNamespace(load_tokenizer=lambda *a, **k: tokenizer))
    assert main(["data", "inspect", str(config)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}:1: 'messages' must be a list of {{role, content}}, got str"
