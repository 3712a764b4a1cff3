"""prepare(): length policy, fully masked examples, stats and the fingerprint cache."""
from __future__ import annotations

import logging

import pytest
from data_helpers import chat, data_cfg

from peftkit.data import DataError, prepare

LONG = "word " * 200


def test_truncate_counts_and_cuts_to_the_limit(write, tokenizer, caplog):
    path = write("train.jsonl", [chat("Hi", "Short."), chat("Tell me more", LONG), chat("Hey", "Fine.")])
    with caplog.at_level(logging.WARNING):
        prepared = prepare(data_cfg(path, max_seq_length=64), tokenizer, progress=False)
    s = prepared.stats
    assert (s["examples"], s["truncated"], s["dropped"], s["skipped"]["truncated"]) == (3, 1, 0, [f"{path}:2"])
    assert max(len(ids) for ids in prepared.train["input_ids"]) == 64
    assert f"train: 1 examples cut to data.max_seq_length (e.g. {path}:2)" in caplog.text


def test_drop_removes_long_examples_and_counts_them(write, tokenizer):
    path = write("train.jsonl", [chat("Hi", "Short."), chat("Tell me more", LONG)])
    s = prepare(data_cfg(path, max_seq_length=64, length_policy="drop"), tokenizer, progress=False).stats
    assert (s["examples"], s["truncated"], s["dropped"], s["skipped"]["dropped"]) == (1, 0, 1, [f"{path}:2"])


def test_examples_whose_labels_are_all_masked_are_counted_and_never_trained(write, tokenizer):
    # The long prompt pushes the reply past the limit: truncation leaves nothing to learn.
    path = write("train.jsonl", [chat("Hi", "Short."), chat(LONG, "Lost reply.")])
    prepared = prepare(data_cfg(path, max_seq_length=64), tokenizer, progress=False)
    s = prepared.stats
    assert (s["examples"], s["truncated"], s["fully_masked"], s["skipped"]["fully_masked"]) == (1, 1, 1, [f"{path}:2"])
    assert all(any(label != -100 for label in labels) for labels in prepared.train["labels"])


def test_no_trainable_examples_left_is_an_error(write, tokenizer):
    path = write("train.jsonl", [chat(LONG, "Lost reply."), chat(LONG, "Also lost.")])
    with pytest.raises(DataError, match=rf"no examples left to train on: 0 dropped as longer than data.max_seq_length=64, "
                                        rf"2 had no trained tokens \(all labels masked, e.g. {path}:1\)"):
        prepare(data_cfg(path, max_seq_length=64), tokenizer, progress=False)


def test_stats_report_tokens_and_trained_share(write, tokenizer):
    path = write("train.jsonl", [chat("Hi", "Hello there."), {"messages": chat("Q", "A")["messages"]}])
    prepared = prepare(data_cfg(path, eval_fraction=0.5), tokenizer, progress=False)
    s = prepared.stats
    labels = prepared.train["labels"][0]
    assert s["tokens"] == len(prepared.train["input_ids"][0]) and s["trained_tokens"] == sum(1 for x in labels if x != -100)
    assert s["trained_share"] == round(s["trained_tokens"] / s["tokens"], 4)
    assert s["rows"] == 2 and s["eval"]["examples"] == 1 and s["packed_sequences"] == 0 and s["template"] == "tokenizer"
    assert prepared.fingerprint.startswith("sha256:") and len(prepared.fingerprint) == 71


def test_cache_reuses_same_data_and_rebuilds_on_any_change(write, tokenizer, peftkit_home):
    path = write("train.jsonl", [chat(f"q{i}", f"a{i}") for i in range(6)])
    first = prepare(data_cfg(path), tokenizer, progress=False)
    again = prepare(data_cfg(path), tokenizer, progress=False)
    assert (first.stats["cached"], again.stats["cached"]) == (False, True)
    assert again.fingerprint == first.fingerprint and again.train["input_ids"] == first.train["input_ids"]
    assert (peftkit_home / "cache" / "data" / first.fingerprint.split(":")[1] / "stats.json").is_file()
    assert not [p for p in (peftkit_home / "cache" / "data").iterdir() if p.name.startswith(".")]  # no temp leftovers
    changed_setting = prepare(data_cfg(path, max_seq_length=512), tokenizer, progress=False)
    write("train.jsonl", [chat(f"q{i}", f"a{i}") for i in range(7)])
    changed_file = prepare(data_cfg(path), tokenizer, progress=False)
    assert len({first.fingerprint, changed_setting.fingerprint, changed_file.fingerprint}) == 3
    assert changed_file.stats["cached"] is False and changed_file.stats["examples"] == 7


def test_cache_dir_setting_and_tokenizer_in_fingerprint(write, tokenizer, llama3_tokenizer, tmp_path):
    path = write("train.jsonl", [chat("q", "a")])
    ours = prepare(data_cfg(path, cache_dir=str(tmp_path / "c")), tokenizer, progress=False)
    assert (tmp_path / "c" / ours.fingerprint.split(":")[1]).is_dir()
    assert prepare(data_cfg(path), llama3_tokenizer, progress=False).fingerprint != ours.fingerprint


def test_moved_data_keeps_its_fingerprint(write, tokenizer, tmp_path):
    rows = [chat(f"q{i}", f"a{i}") for i in range(3)]
    first = prepare(data_cfg(write("train.jsonl", rows)), tokenizer, progress=False)
    moved = prepare(data_cfg(write("renamed.jsonl", rows)), tokenizer, progress=False)
    assert moved.fingerprint == first.fingerprint and moved.stats["cached"] is True
    assert moved.stats["sources"][0]["path"] == str(tmp_path / "renamed.jsonl")
