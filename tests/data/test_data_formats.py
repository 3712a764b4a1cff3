"""Every dataset shape and source type prepares into the same trained text."""
from __future__ import annotations

import json

import pytest
from data_helpers import chat, data_cfg, trained_text

from peftkit.config import DataConfig
from peftkit.data import DataError, prepare


def first(prepared):
    row = prepared.train[0]
    return row["input_ids"], row["labels"]


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {"conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}]},
    {"instruction": "Capital of France?", "output": "Paris."},
    {"instruction": "Capital of France?", "input": "", "output": "Paris."},
    {"prompt": "Capital of France?", "completion": "Paris."},
], ids=["chat", "sharegpt", "instruction", "instruction-empty-input", "completion"])
def test_chat_shaped_formats_render_the_same_conversation(write, tokenizer, row):
    prepared = prepare(data_cfg(write("train.jsonl", [row])), tokenizer, progress=False)
    ids, labels = first(prepared)
    assert tokenizer.decode(ids).endswith("<|im_start|>user\nCapital of France?<|im_end|>\n"
                                          "<|im_start|>assistant\nParis.<|im_end|>\n")
    assert trained_text(tokenizer, ids, labels) == ["Paris.<|im_end|>"]


def test_instruction_input_joins_after_a_blank_line(write, tokenizer):
    path = write("train.jsonl", [{"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be exact."}])
    ids, _ = first(prepare(data_cfg(path), tokenizer, progress=False))
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\nTranslate\n\nchat<|im_end|>")


def test_text_format_trains_every_token_and_ends_with_eos(write, tokenizer):
    ids, labels = first(prepare(data_cfg(write("train.jsonl", [{"text": "Once upon a time."}])), tokenizer, progress=False))
    assert ids == tokenizer("Once upon a time.")["input_ids"] + [tokenizer.eos_token_id]
    assert labels == [-100] + ids[1:]  # the first token has nothing before it to predict it


def test_column_mapping_renames_fields(write, tokenizer):
    path = write("train.jsonl", [{"question": "2+2?", "answer": "4"}])
    prepared = prepare(data_cfg(path, columns={"question": "instruction", "answer": "output"}), tokenizer, progress=False)
    assert prepared.stats["sources"][0]["format"] == "instruction"
    assert trained_text(tokenizer, *first(prepared)) == ["4<|im_end|>"]


def test_column_mapping_error_names_the_mapping(write, tokenizer):
    path = write("train.jsonl", [{"q": "2+2?", "answer": "4"}])
    with pytest.raises(DataError, match=r":1: 'instruction' is missing .*data.columns maps question -> instruction, "
                                        r"but this row has no 'question'"):
        prepare(data_cfg(path, format="instruction", columns={"question": "instruction", "answer": "output"}),
                tokenizer, progress=False)


def test_json_array_errors_name_the_line_of_the_item(write, tokenizer):
    rows = [chat("Hi", "Hello"), {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}]
    path = write("train.json", "[\n" + ",\n".join(json.dumps(r, indent=1) for r in rows) + "\n]\n")
    line = 2 + json.dumps(rows[0], indent=1).count("\n") + 1
    with pytest.raises(DataError, match=rf"^{path}:{line}: messages\[1\] \(assistant\) has empty content"):
        prepare(data_cfg(path), tokenizer, progress=False)
    good = write("good.json", json.dumps([chat("Hi", "Hello"), chat("Yo", "Hey")], indent=2))
    assert prepare(data_cfg(good), tokenizer, progress=False).stats["examples"] == 2


def test_csv_reads_columns_and_names_lines(write, tokenizer):
    path = write("train.csv", 'prompt,completion\n"Say ""hi""",hi\n"Two\nlines",ok\nThird,\n')
    with pytest.raises(DataError, match=rf"^{path}:5: 'completion' is empty"):
        prepare(data_cfg(path), tokenizer, progress=False)
    good = write("good.csv", 'prompt,completion\n"Say ""hi""",hi\n')
    assert trained_text(tokenizer, *first(prepare(data_cfg(good), tokenizer, progress=False))) == ["hi<|im_end|>"]


def test_parquet_and_save_to_disk_folders(tmp_path, tokenizer):
    import datasets

    rows = [{"prompt": "Ping", "completion": "Pong"}, {"prompt": "Ding", "completion": ""}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    for path, where in ((tmp_path / "train.parquet", "row 2"), (tmp_path / "saved", "row 2")):
        with pytest.raises(DataError, match=rf"^{path} {where}: 'completion' is empty"):
            prepare(data_cfg(path), tokenizer, progress=False)
    ds.select([0]).save_to_disk(str(tmp_path / "one"))
    assert trained_text(tokenizer, *first(prepare(data_cfg(tmp_path / "one"), tokenizer, progress=False))) == ["Pong<|im_end|>"]


def test_sources_mix_by_weight_with_per_source_counts(write, tokenizer):
    a = write("a.jsonl", [chat(f"a{i}", f"A{i}") for i in range(10)])
    b = write("b.jsonl", [{"text": f"document {i}"} for i in range(10)])
    cfg = DataConfig(sources=[{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5, "format": "text"}],
                     eval_fraction=0.2)
    stats = prepare(cfg, tokenizer, progress=False).stats
    assert [(s["format"], s["rows"], s["train_rows"], s["eval_rows"], s["examples"]) for s in stats["sources"]] == [
        ("chat", 10, 8, 2, 16), ("text", 10, 8, 2, 4)]
    assert stats["examples"] == 20 and stats["eval"]["examples"] == 4 and stats["rows"] == 20


def test_eval_file_replaces_the_held_out_fraction(write, tokenizer):
    train = write("train.jsonl", [chat(f"q{i}", f"a{i}") for i in range(10)])
    held = write("eval.jsonl", [{"prompt": "x", "completion": "y"}] * 3)
    prepared = prepare(DataConfig(path=str(train), eval_path=str(held), eval_fraction=0.5), tokenizer, progress=False)
    assert prepared.stats["examples"] == 10 and len(prepared.eval) == 3
    assert trained_text(tokenizer, prepared.eval[0]["input_ids"], prepared.eval[0]["labels"]) == ["y<|im_end|>"]


def test_bad_sources_settings(write, tokenizer):
    a = write("a.jsonl", [chat("q", "a")])
    for sources, words in (([{"path": str(a), "wieght": 2}], "data.sources[0] has unknown key 'wieght'"),
                           ([{"path": str(a), "weight": 0}], "data.sources[0].weight=0 must be a number above 0"),
                           ([{"weight": 1}], "data.sources[0] must be a mapping with at least a path")):
        with pytest.raises(DataError, match=words.replace("[", r"\[").replace("]", r"\]")):
            prepare(DataConfig(sources=sources), tokenizer, progress=False)
    with pytest.raises(DataError, match="no training data: set data.path"):
        prepare(DataConfig(), tokenizer, progress=False)
