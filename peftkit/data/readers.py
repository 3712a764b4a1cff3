"""Read data files into rows, each tagged with where it came from ("train.jsonl:41", "data.parquet row 7").

Supported: .jsonl/.ndjson, .json (a list of objects, or one object per line), .csv/.tsv, .parquet,
a `datasets` save_to_disk folder, and one split of a Hugging Face Hub dataset named by its id (ORG/NAME)
when no such local file or folder exists. Text files must be UTF-8; a UTF-8 byte-order mark at the very
start is tolerated (editors on Windows write one), every other encoding problem is an error that names
the line, because a half-decoded file trains on garbage.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.data.errors import DataError

log = logging.getLogger(__name__)

UTF8_BOM = b"\xef\xbb\xbf"
OTHER_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
NOT_HUB_IDS = SUFFIXES + (".txt", ".arrow", ".gz", ".zst", ".bz2", ".xz")  # a missing "org/x.jsonl" is a missing file


@dataclass(frozen=True)
class Row:
    """One record and where it came from, so any later error can name the file and line."""

    where: str
    fields: dict[str, Any]


def read_rows(path: str | Path, *, split: str = "train", subset: str | None = None, revision: str | None = None,
              offline: bool = False) -> list[Row]:
    """Return every row of a data file, save_to_disk folder or hub dataset split, in file order.

    split, subset, revision and offline apply only to a hub dataset id.
    """
    raw, path = str(path), Path(path)
    name = str(path)
    if path.is_dir():
        return _read_saved_dataset(path, name)
    if not path.exists() and is_hub_dataset(raw):
        return read_hub_rows(raw, split=split, subset=subset, revision=revision, offline=offline)
    if not path.exists():
        raise DataError(f"{name}: no such file or folder; check data.path (relative paths start from {Path.cwd()})")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{name}: unsupported file type {suffix or '(none)'!r}; use one of {', '.join(SUFFIXES)} "
                        "or a datasets save_to_disk folder")
    if suffix == ".parquet":
        return _read_parquet(path, name)
    text = _decode(path.read_bytes(), name)
    if suffix in (".csv", ".tsv"):
        rows = _read_csv(text, name, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".json" and text.lstrip().startswith("["):
        rows = _read_json_array(text, name)
    else:  # .jsonl, and .json files holding one object per line (a common naming slip)
        rows = _read_jsonl(text, name)
    if not rows:
        raise DataError(f"{name}: has no rows (only blank lines or an empty list); put at least one example in it")
    return rows


def is_hub_dataset(text: str) -> bool:
    """Return True when text reads as a hub dataset id (ORG/NAME) rather than a data file's name."""
    from peftkit.hub import is_repo_id

    return is_repo_id(text) and Path(text).suffix.lower() not in NOT_HUB_IDS


def read_hub_rows(repo_id: str, *, split: str = "train", subset: str | None = None, revision: str | None = None,
                  offline: bool = False, key: str = "data.path") -> list[Row]:
    """Return the rows of one split of a Hugging Face Hub dataset, each tagged "ORG/NAME[split] row 7"."""
    import datasets

    from peftkit import hub

    reason = hub.offline_reason(offline, "data.offline")
    try:
        with hub.offline_mode(reason is not None):
            ds = datasets.load_dataset(repo_id, subset, split=split, revision=revision)
    except Exception as exc:  # noqa: BLE001 - datasets and the hub raise many types; sorted below
        if reason is not None and hub.is_network_error(exc):  # offline mode refused the request: not cached
            raise DataError(hub.not_cached(key, repo_id, revision, reason, Path(datasets.config.HF_DATASETS_CACHE), "dataset")) from None
        if isinstance(exc, ValueError) and ("split" in str(exc).lower() or "config" in str(exc).lower()):
            raise DataError(f"{key}={repo_id!r}: {exc}; set data.split (e.g. train, test) or data.subset to one it names") from None
        raise DataError(hub.download_problem(exc, repo_id, key=key, kind="dataset", revision=revision)) from None
    if isinstance(ds, datasets.DatasetDict):  # only when split is None, which config checks refuse; kept for callers
        raise DataError(f"{key}={repo_id!r} has splits {', '.join(ds)}; choose one with data.split")
    if len(ds) == 0:
        raise DataError(f"{key}={repo_id!r}: split {split!r} has no rows")
    where = f"{repo_id}[{split}]"
    return [Row(f"{where} row {i}", record) for i, record in enumerate(ds.to_list(), start=1)]


def _decode(data: bytes, name: str) -> str:
    """Return the file's text, refusing anything that is not clean UTF-8."""
    if not data:
        raise DataError(f"{name}: the file is empty (0 bytes); point data.path at a file with examples")
    for bom, encoding in OTHER_BOMS.items():
        if data.startswith(bom):
            raise DataError(f"{name}:1: starts with a {encoding} byte-order mark; re-save the file as UTF-8 "
                            f"(e.g. `iconv -f {encoding} -t UTF-8 {name} > fixed{Path(name).suffix}`)")
    if data.startswith(UTF8_BOM):
        log.info("%s: skipping the UTF-8 byte-order mark at the start of the file", name)
        data = data[len(UTF8_BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{name}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); "
                        f"re-save the file as UTF-8 (e.g. `iconv -f latin1 -t UTF-8 {name} > fixed{Path(name).suffix}`)") from None
    # A byte-order mark at the start of a later line is a second file glued on; U+FEFF elsewhere is text
    # (a zero-width no-break space, common in scraped pages) and is left to the JSON or CSV reader.
    if (glued := text.find("\n\ufeff")) >= 0:
        line = text.count("\n", 0, glued) + 2
        raise DataError(f"{name}:{line}: a byte-order mark in the middle of the file (were files concatenated?); "
                        "remove it, e.g. `sed -i 's/\\xEF\\xBB\\xBF//g' FILE`")
    return text


def _read_jsonl(text: str, name: str) -> list[Row]:
    rows = []
    # Lines end at "\n" only: str.splitlines() also splits at U+2028, U+0085 and other characters that
    # JSON strings may hold unescaped, which would cut a valid row in two and shift every line number.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (often a trailing one) carry no data
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{name}:{number}: {_json_problem(exc)}; each line must be one complete JSON object") from None
        rows.append(_as_row(value, f"{name}:{number}", "each line must be a JSON object such as {\"messages\": [...]}"))
    return rows


def _json_problem(exc: ValueError | RecursionError) -> str:
    """Return why json refused a text, in words (json raises three kinds of error for bad input)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "not readable JSON (nested too deeply: more than about 1000 levels of [ or {)"
    return f"not readable JSON ({exc})"  # e.g. an integer of more than 4300 digits


def _read_json_array(text: str, name: str) -> list[Row]:
    """Parse a top-level JSON list element by element so each row knows its line."""
    decoder = json.JSONDecoder()
    rows: list[Row] = []
    pos, line = text.index("[") + 1, 1 + text.count("\n", 0, text.index("["))
    while True:
        start = _skip_space(text, pos)
        line += text.count("\n", pos, start)
        if start < len(text) and text[start] == "]" and not rows:
            return rows
        try:
            value, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError) as exc:
            at = exc.lineno if isinstance(exc, json.JSONDecodeError) else line
            raise DataError(f"{name}:{at}: {_json_problem(exc)}; the file must be one JSON list of objects") from None
        rows.append(_as_row(value, f"{name}:{line}", "each list item must be a JSON object such as {\"messages\": [...]}"))
        line += text.count("\n", start, end)
        pos = _skip_space(text, end)
        line += text.count("\n", end, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            return rows
        raise DataError(f"{name}:{line}: expected ',' or ']' after a list item; the file must be one JSON list of objects")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_csv(text: str, name: str, delimiter: str) -> list[Row]:
    # The csv module refuses cells over 128 KiB by default; the whole file is in memory already, so a
    # long document in one cell is no risk. The limit is process-wide and only ever raised here.
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows, line = [], 1
    try:
        for record in reader:
            start, line = line + 1, reader.line_num
            if not any((v or "").strip() for v in record.values() if isinstance(v, str)):
                continue  # blank lines, tolerated as in JSONL
            if None in record:
                raise DataError(f"{name}:{start}: more cells than header columns ({', '.join(reader.fieldnames or [])}); "
                                "quote cells that contain the delimiter")
            rows.append(Row(f"{name}:{start}", dict(record)))
    except csv.Error as exc:
        raise DataError(f"{name}:{reader.line_num}: not valid CSV ({exc}); quote cells that contain newlines or quotes") from None
    if reader.fieldnames is None:
        raise DataError(f"{name}: has no header line; the first line must name the columns")
    return rows


def _read_parquet(path: Path, name: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise DataError(f"{name}: not a readable parquet file ({exc}); re-export it with pandas or pyarrow") from None
    if not records:
        raise DataError(f"{name}: the parquet file has no rows")
    return [Row(f"{name} row {i}", record) for i, record in enumerate(records, start=1)]


def _read_saved_dataset(path: Path, name: str) -> list[Row]:
    import datasets

    if not any((path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{name}: a folder that is not a datasets save_to_disk folder; "
                        "point data.path at a data file or at a folder written by Dataset.save_to_disk")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{name}: this DatasetDict has splits {', '.join(ds)} but no 'train'; "
                            "save the split to train on, e.g. ds['data'].save_to_disk(...)")
        ds = ds["train"]
    if len(ds) == 0:
        raise DataError(f"{name}: the saved dataset has no rows")
    return [Row(f"{name} row {i}", record) for i, record in enumerate(ds.to_list(), start=1)]


def _as_row(value: Any, where: str, fix: str) -> Row:
    if not isinstance(value, dict):
        raise DataError(f"{where}: {fix}, got {type(value).__name__}")
    return Row(where, value)
