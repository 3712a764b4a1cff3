"""What tests/data/test_fuzz_data.py found in the readers, each pinned by the example that showed it."""
from __future__ import annotations

import json

import pytest

from peftkit.data import DataError
from peftkit.data.prepare import read_examples
from peftkit.data.readers import read_rows


@pytest.mark.parametrize("suffix, text, line", [
    # Was RecursionError: maximum recursion depth exceeded while decoding a JSON array.
    (".jsonl", '{"text": "a"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n", 2),
    (".json", '[{"text": "a"},\n {"text": ' + "[" * 100_000 + "]" * 100_000 + "}]", 2),
])
def test_json_nested_thousands_deep_names_file_and_line(write, suffix, text, line):
    path = write(f"train{suffix}", text)
    with pytest.raises(DataError) as err:
        read_rows(path)
    assert str(err.value).startswith(f"{path}:{line}: not readable JSON (nested too deeply")


def test_an_integer_of_thousands_of_digits_names_file_and_line(write):
    # Was ValueError: Exceeds the limit (4300 digits) for integer string conversion (not a JSONDecodeError).
    path = write("train.jsonl", '{"text": "a"}\n{"text": "b", "n": ' + "7" * 5000 + "}\n")
    with pytest.raises(DataError) as err:
        read_rows(path)
    assert str(err.value).startswith(f"{path}:2: not readable JSON (Exceeds the limit (4300 digits)")


@pytest.mark.parametrize("odd", ["\u2028", "\u2029", "\x85"])  # NEL: U+0085
def test_line_separators_inside_a_json_string_do_not_split_the_row(write, odd):
    # json.dumps(ensure_ascii=False) leaves these unescaped; str.splitlines() used to cut the row there,
    # refusing valid files and shifting every later line number.
    rows = [{"text": f"before{odd}after"}, {"text": "next"}]
    path = write("train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    examples, fmt = read_examples(str(path), "auto", {})
    assert fmt == "text" and [e.text for e in examples] == [f"before{odd}after", "next"]
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:2"]


def test_a_csv_cell_longer_than_128_kib_is_read(write):
    # Was refused as "not valid CSV (field larger than field limit (131072)); quote cells that contain newlines".
    long_text = "word " * 40_000
    path = write("train.csv", f'text\n"{long_text}"\nshort\n')
    assert [r.fields["text"] for r in read_rows(path)] == [long_text, "short"]


def test_a_zero_width_no_break_space_inside_text_is_read(write):
    # U+FEFF inside a JSON string is text (scraped pages hold it); it was refused as "a byte-order mark in the middle".
    path = write("train.jsonl", json.dumps({"text": "a\ufeffb"}, ensure_ascii=False) + "\n")
    assert [r.fields["text"] for r in read_rows(path)] == ["a\ufeffb"]
