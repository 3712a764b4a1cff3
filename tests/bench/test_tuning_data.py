"""The preset study's data sets (peftkit.bench.tuning_data): reproducible, split without leaks, shaped as intended."""
from __future__ import annotations

import json
import re
import statistics

import pytest

from peftkit.bench.tuning_data import DATA_SETS, build, data_set_files, main
from peftkit.config import DataConfig
from peftkit.data import prepare
from peftkit.data.prepare import read_examples

BUILT = [name for name, data_set in DATA_SETS.items() if data_set.groups is not None]
TARGET = {"instruction": "output", "completion": "completion", "text": "text"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Return (output folder, counts) of one build."""
    out = tmp_path_factory.mktemp("tuning-data")
    return out, build(out)


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def runs(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + 8]) for i in range(len(words) - 7)}


def test_the_command_writes_the_same_bytes_as_another_build(built, tmp_path, capsys):
    out, _ = built
    main(["--out", str(tmp_path)])
    assert "pydoc: instruction, 160 train + 40 eval rows" in capsys.readouterr().out
    first = sorted(p.relative_to(out) for p in out.rglob("*.jsonl"))
    assert first == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.jsonl"))
    assert len(first) == 2 * len(BUILT)
    assert all((out / p).read_bytes() == (tmp_path / p).read_bytes() for p in first)


def test_counts_are_the_files_and_all_four_sets_are_listed(built):
    out, counts = built
    files = data_set_files(out)
    assert list(files) == ["shop", "pydoc", "stdlib-qa", "stdlib-text"] and list(counts) == BUILT
    assert all(train.is_file() and held.is_file() for train, held in files.values())
    for name in BUILT:
        train, held = files[name]
        assert counts[name] == {"format": DATA_SETS[name].format, "train": len(rows(train)), "eval": len(rows(held))}
        assert 150 <= counts[name]["train"] <= 170 and 35 <= counts[name]["eval"] <= 45, counts[name]


@pytest.mark.parametrize("name", BUILT)
def test_eval_rows_share_no_row_prompt_or_near_copy_with_train(built, name):
    train, held = (rows(p) for p in data_set_files(built[0])[name])
    target = TARGET[DATA_SETS[name].format]
    prompt = {"output": lambda r: (r["instruction"], r["input"]), "completion": lambda r: r["prompt"],
              "text": lambda r: r["text"].split("\n")[0].split(".")[0]}[target]  # text: the module
    assert len({json.dumps(r) for r in train + held}) == len(train) + len(held)
    assert not {prompt(r) for r in train} & {prompt(r) for r in held}
    assert not {r[target] for r in train} & {r[target] for r in held}
    train_runs = set().union(*(runs(r[target]) for r in train))
    for row in held:
        mine = runs(row[target])
        assert len(mine & train_runs) <= len(mine) / 4, f"{name}: eval row repeats train text: {row[target][:80]!r}"


@pytest.mark.parametrize("name", list(DATA_SETS))
def test_each_set_is_detected_as_its_format_and_prepares_whole_in_256_tokens(built, tokenizer, name):
    train, held = data_set_files(built[0])[name]
    for path in (train, held):
        assert read_examples(str(path), "auto", {})[1] == DATA_SETS[name].format
    cfg = DataConfig(path=str(train), eval_path=str(held), max_seq_length=256)
    prepared = prepare(cfg, tokenizer, progress=False, use_cache=False)
    stats = prepared.stats
    assert (stats["truncated"], stats["dropped"], stats["fully_masked"]) == (0, 0, 0)
    assert stats["examples"] == len(rows(train)) and stats["eval"]["examples"] == len(rows(held))
    lengths = [len(ids) for split in (prepared.train, prepared.eval) for ids in split["input_ids"]]
    assert 32 <= min(lengths) and max(lengths) <= 256 and 40 <= statistics.mean(lengths) <= 200, (min(lengths), max(lengths))
