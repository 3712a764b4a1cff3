"""Fuzzing the data readers: a malformed file either reads cleanly or stops with a DataError naming the file and line.

The normal suite runs a small fixed-seed sample; the long form draws fresh examples:
    PEFTKIT_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/data/test_fuzz_data.py -q -p no:cacheprovider \
        --hypothesis-show-statistics
(docs/reliability.md records what it found).
"""
from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from peftkit.data.errors import DataError
from peftkit.data.formats import FORMATS
from peftkit.data.prepare import read_examples
from peftkit.errors import PeftkitError

EXAMPLES = int(os.environ.get("PEFTKIT_FUZZ_EXAMPLES", "0")) or 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="PEFTKIT_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck), print_blob=True)
FIELDS = ["messages", "conversations", "instruction", "output", "input", "system", "prompt", "completion", "text",
          "role", "content", "question", "answer"]
ODD_TEXT = ["", " ", "\u2028", "\u2029", "\x85", "\x0b", "\x1c", "\ufeff", "\x00", "\r", "é", "😀", "\ud7ff", "x" * 140_000]

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(ODD_TEXT)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
turns = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "gpt", "human", "bot", 3, None]) | json_values,
                                            "from": st.sampled_from(["human", "gpt"]),
                                            "content": st.text(max_size=30) | st.sampled_from(ODD_TEXT) | json_values,
                                            "value": st.text(max_size=10)})
field_values = st.lists(turns, max_size=4) | st.text(max_size=40) | st.sampled_from(ODD_TEXT) | json_values
rows = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), field_values, max_size=5)


@st.composite
def json_line(draw) -> str:
    """Return one line of a JSONL file: a row, or one of the ways a line goes wrong."""
    kind = draw(st.sampled_from(["row", "row", "row", "value", "garbage", "cut", "deep", "bigint", "blank"]))
    if kind == "row":
        return json.dumps(draw(rows), ensure_ascii=draw(st.booleans()))
    if kind == "value":
        return json.dumps(draw(json_values), ensure_ascii=False)
    if kind == "cut":
        text = json.dumps(draw(rows), ensure_ascii=False)
        return text[:draw(st.integers(0, max(0, len(text) - 1)))]
    if kind == "deep":
        depth = draw(st.sampled_from([50, 5_000, 200_000]))
        return '{"text": ' + "[" * depth + "]" * depth + "}"
    if kind == "bigint":
        return '{"text": "x", "n": ' + "7" * draw(st.sampled_from([10, 5_000, 50_000])) + "}"
    return draw(st.text(max_size=30)) if kind == "garbage" else draw(st.sampled_from(["", "  ", "\t"]))


@st.composite
def jsonl_bytes(draw) -> bytes:
    """Return a JSONL (or JSON-array) file's bytes, with odd line ends, BOMs and broken bytes mixed in."""
    lines = draw(st.lists(json_line(), max_size=6))
    if draw(st.booleans()) and lines:
        text = "[" + ",\n".join(lines) + draw(st.sampled_from(["]", "", ",]", "]]"]))
    else:
        text = draw(st.sampled_from(["\n", "\r\n"])).join(lines)
    return _damage(draw, text.encode("utf-8", "surrogatepass"))


@st.composite
def csv_bytes(draw, delimiter: str) -> bytes:
    """Return a CSV/TSV file's bytes: a header, then rows with the wrong number of cells, quotes and newlines."""
    cell = st.text(max_size=15) | st.sampled_from(ODD_TEXT + ['"', '""', 'a"b', "a\nb", delimiter, '"x\ny"'])
    header = draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=6), max_size=4))
    body = draw(st.lists(st.lists(cell, max_size=5), max_size=5))
    quote = draw(st.booleans())
    render = (lambda c: '"' + c.replace('"', '""') + '"') if quote else (lambda c: c)
    text = "\n".join(delimiter.join(render(c) for c in line) for line in [header, *body])
    return _damage(draw, text.encode("utf-8", "surrogatepass"))


def _damage(draw, data: bytes) -> bytes:
    """Return data with a byte-order mark, invalid UTF-8 or a cut sometimes applied."""
    how = draw(st.sampled_from(["none", "none", "bom8", "bom16", "latin1", "cut", "empty"]))
    if how == "bom8":
        return codecs.BOM_UTF8 + data
    if how == "bom16":
        return codecs.BOM_UTF16_LE + data
    if how == "latin1":
        at = draw(st.integers(0, len(data)))
        return data[:at] + b"\xe9\xff" + data[at:]
    if how == "cut":
        return data[:draw(st.integers(0, len(data)))]
    return b"" if how == "empty" else data


def _check(path: Path, data: bytes, fmt: str) -> None:
    """Read path; a failure must be a DataError that names the file and a line that exists in it."""
    try:
        examples, _ = read_examples(str(path), fmt, {})
    except PeftkitError as exc:
        assert isinstance(exc, DataError), f"{type(exc).__name__} from the data readers: {exc}"
        message = str(exc)
        event(f"refused: {re.sub(r'[0-9]+', 'N', message[len(str(path)):].split(';')[0])[:60]}")
        assert message.startswith(str(path)), message
        line = re.match(re.escape(str(path)) + r":(\d+):", message)
        lines = len(re.split(rb"\r\n|\r|\n", data))  # csv, like editors, also ends a line at a lone \r
        if line:
            assert 1 <= int(line[1]) <= lines, f"line {line[1]} of a {lines}-line file: {message}"
        return
    event("read")
    for e in examples:
        assert e.where.startswith(f"{path}:")
        assert all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in e.messages or [])
        assert e.messages is not None or isinstance(e.text, str)


@FUZZ
@given(data=jsonl_bytes(), suffix=st.sampled_from([".jsonl", ".json"]), fmt=st.sampled_from(["auto", *FORMATS]))
def test_any_jsonl_file_reads_or_names_file_and_line(tmp_path_factory, data, suffix, fmt):
    path = tmp_path_factory.getbasetemp() / f"fuzz{suffix}"
    path.write_bytes(data)
    _check(path, data, fmt)


@FUZZ
@given(data=st.data(), suffix=st.sampled_from([".csv", ".tsv"]), fmt=st.sampled_from(["auto", *FORMATS]))
def test_any_csv_file_reads_or_names_file_and_line(tmp_path_factory, data, suffix, fmt):
    raw = data.draw(csv_bytes("\t" if suffix == ".tsv" else ","))
    path = tmp_path_factory.getbasetemp() / f"fuzz{suffix}"
    path.write_bytes(raw)
    _check(path, raw, fmt)


valid_text = st.text(min_size=1, max_size=20).filter(str.strip) | st.sampled_from(["a\u2028b", "z\ufeffw", "x\x85y", "p\x0bq", "r\x1cs", "é😀", "tab\tz"])
# One format per file (auto detects it from the first row), each with text that only looks odd.
valid_files = st.one_of(
    st.lists(st.builds(lambda u, a: {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]},
                       valid_text, valid_text), min_size=1, max_size=6),
    st.lists(st.builds(lambda i, o: {"instruction": i, "output": o}, valid_text, valid_text), min_size=1, max_size=6),
    st.lists(st.builds(lambda t: {"text": t}, valid_text), min_size=1, max_size=6))


@FUZZ
@given(rows=valid_files, end=st.sampled_from(["\n", "\r\n"]), bom=st.booleans(),
       blanks=st.lists(st.booleans(), min_size=6, max_size=6), ascii_only=st.booleans())
def test_valid_jsonl_reads_every_row_at_its_own_line(tmp_path_factory, rows, end, bom, blanks, ascii_only):
    # Odd characters that JSON strings may hold unescaped (U+2028, NEL, VT) must not split a row.
    lines, where = [], []
    for row, blank in zip(rows, blanks):
        if blank:
            lines.append("")
        lines.append(json.dumps(row, ensure_ascii=ascii_only))
        where.append(len(lines))
    path = tmp_path_factory.getbasetemp() / "valid.jsonl"
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + end.join(lines).encode("utf-8"))
    examples, _ = read_examples(str(path), "auto", {})
    assert [e.where for e in examples] == [f"{path}:{n}" for n in where]
