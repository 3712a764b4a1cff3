"""Small training sets of different shapes, made from the Python standard library, for choosing presets (#19).

Settings chosen on one data set may only suit that set, so the preset study trains on four: the bundled
shop conversations and three sets built here from text every Python install carries (nothing is
downloaded). Each set is about 160 train and 40 eval rows of roughly 40-200 tokens, so one epoch at
batch 8 takes well under a minute on two CPU cores.

The eval rows share no section, subject or module with the train rows: rows come in groups (a section of
the reference, a question's subject, a module) and whole groups, about a fifth of the rows, are held out.
Everything is sorted and nothing depends on the machine, the hash seed or installed packages, so one
Python version gives the same bytes everywhere. Patch releases edit the docs: 3.11.2 and 3.11.7 give the
same stdlib-qa but differ in 5 of 200 stdlib-text rows and 65 of 200 pydoc rows, so a study records the
Python version with its results.

    python -m peftkit.bench.tuning_data --out runs/tuning-data
"""
from __future__ import annotations

import argparse
import builtins
import html.entities
import http
import importlib
import inspect
import json
import platform
import re
import textwrap
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
TRAIN_ROWS, EVAL_ROWS = 160, 40
MIN_CHARS, MAX_CHARS = 150, 600  # about 35-150 tokens of prose: long enough to learn from, short enough to train fast


@dataclass(frozen=True)
class DataSet:
    """One data set of the preset study: its row format, where its text comes from, and what a row is."""

    format: str
    source: str
    about: str
    groups: Callable[[], dict[str, list[dict]]] | None = None
    """Builds the rows, grouped by what must not cross the train/eval split; None for the bundled shop files."""


def pydoc_groups() -> dict[str, list[dict]]:
    """Return instruction rows from the Python reference (pydoc_data.topics), grouped by section.

    A row is a section ("Explain the Python topic 'Lambdas'") or a name documented in it ("What does
    `str.casefold()` do?") and its first paragraphs. Topics overlap (if, while and for also sit in
    compound), so each section title or name is kept once, under the first topic in sorted order.
    """
    from pydoc_data.topics import topics

    groups: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for topic in sorted(topics):
        for section, title, paragraphs, is_name in _reference_parts(topics[topic]):
            output = _first_paragraphs(paragraphs)
            if title in seen or output is None:
                continue
            seen.add(title)
            phrases = NAME_PHRASES if is_name else SECTION_PHRASES
            instruction, given = phrases[zlib.crc32(title.encode()) % len(phrases)]
            row = {"instruction": instruction.format(title), "input": title if given else "", "output": output}
            groups.setdefault(f"{topic}: {section}", []).append(row)
    return groups


# (instruction, whether the title goes in `input` instead), picked per title by a checksum of the title.
SECTION_PHRASES = (("Explain the Python topic '{}'.", False), ("What does the Python language reference say about '{}'?", False),
                   ("Summarize the Python documentation on '{}'.", False),
                   ("Explain this part of the Python language reference in a few sentences.", True))
NAME_PHRASES = (("What does `{}` do in Python?", False), ("Explain `{}`.", False),
                ("Describe this Python API as its documentation does.", True))
HEADING = re.compile(r"^(\S.*)\n([*=\-~^])\2+\n", re.M)
SIGNATURE = re.compile(r"^(?:class |classmethod |staticmethod )?[\w.]+\(.*\)$")


def _reference_parts(topic_text: str) -> list[tuple[str, str, list[str], bool]]:
    """Return (section, title, paragraphs, is a documented name) for each section and each `name(...)` in it."""
    parts = []
    headings = list(HEADING.finditer(topic_text))
    for i, head in enumerate(headings):
        end = headings[i + 1].start() if i + 1 < len(headings) else len(topic_text)
        prose, entries, in_entry = [], [], False
        for block in re.split(r"\n\s*\n", topic_text[head.end():end].strip("\n")):
            indent = len(block) - len(block.lstrip(" "))
            if indent == 0 and SIGNATURE.match(block):
                entries.append((block, []))
                in_entry = True
            elif indent == 0:
                prose.append(_unwrap(block))
                in_entry = False  # unindented prose ends the entry's description
            elif in_entry and indent == 3:
                entries[-1][1].append(_unwrap(block))
            else:  # code and grammar, indented deeper than the text around them
                (entries[-1][1] if in_entry else prose).append(textwrap.indent(textwrap.dedent(block), "    "))
        parts += [(head.group(1), name, paragraphs, True) for name, paragraphs in entries]
        parts.append((head.group(1), head.group(1), prose, False))
    return parts


def stdlib_qa_groups() -> dict[str, list[dict]]:
    """Return short prompt/completion questions on five kinds of standard-library facts, one group per subject.

    Forty subjects of each kind, spread evenly over the sorted candidates; group keys start with the
    kind and hold one row each, so split() holds out every fifth: eight of each kind. errno is left
    out: its numbers and messages differ between operating systems.
    """
    kinds = {
        "http": [(str(s.value), f"What is HTTP status {s.value} called?", s.phrase) for s in http.HTTPStatus],
        "builtin": [(name, f"What does Python's built-in `{name}()` do?", first)
                    for name, function in sorted(vars(builtins).items()) if not name.startswith("_")
                    and getattr(function, "__self__", None) is builtins and (first := _first_sentence(function.__doc__))],
        "exception": [(name, f"What is {name} in Python?",
                       f"A subclass of {cls.__bases__[0].__name__}. {_first_sentence(cls.__doc__)}")
                      for name, cls in sorted(vars(builtins).items()) if isinstance(cls, type) and issubclass(cls, BaseException)
                      and cls.__module__ == "builtins" and cls.__name__ == name and cls.__doc__ and cls is not BaseException],
        "entity": [(name.lower(), f"Which character does the HTML entity &{name}; stand for?",
                    f"{chr(point)} ({unicodedata.name(chr(point))})")
                   for name, point in sorted(html.entities.name2codepoint.items())
                   if chr(point).isprintable() and not chr(point).isspace()],
        "unicode": [(f"{point:04X}", f"What is the Unicode name of the character {chr(point)}?", unicodedata.name(chr(point)))
                    for point in range(0x2190, 0x2700)  # arrows, maths, technical and other symbols: no case pairs
                    if unicodedata.name(chr(point), "") and point not in html.entities.codepoint2name],
    }
    groups = {}
    for kind, candidates in kinds.items():
        # One of Aacute and aacute, one of eval() and exec() ("... the given source in the context of
        # globals and locals."): either pair could straddle the split.
        rows: dict[str, dict] = {}
        runs: set[tuple[str, ...]] = set()
        for subject, question, answer in candidates:
            row = {"prompt": question, "completion": answer}
            if subject not in rows and not repeats(row, runs):
                rows[subject] = row
                runs |= word_runs(row)
        for subject, row in _spread(list(rows.items()), 40):
            groups[f"{kind}:{subject}"] = [row]
    return groups


# Pure-Python or always-built-in modules whose docstrings read the same on every platform.
TEXT_MODULES = ("abc", "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "configparser", "contextlib",
                "copy", "csv", "dataclasses", "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "graphlib",
                "heapq", "hmac", "inspect", "ipaddress", "itertools", "json", "keyword", "logging", "math", "numbers",
                "operator", "optparse", "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "statistics",
                "string", "textwrap", "timeit", "tokenize", "types", "typing", "warnings", "weakref")


def stdlib_text_groups() -> dict[str, list[dict]]:
    """Return raw-text rows: docstrings of standard-library modules and their public names, grouped by module."""
    groups: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for module_name in TEXT_MODULES:
        module = importlib.import_module(module_name)
        names = sorted(getattr(module, "__all__", None) or (n for n in vars(module) if not n.startswith("_")))
        documented = [(module_name, module)] + [(f"{module_name}.{n}", getattr(module, n)) for n in names if n in vars(module)]
        for title, obj in documented:
            # Only objects with a docstring of their own: inherited ones would repeat across modules.
            if obj is not module and not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            doc = obj.__doc__ if isinstance(obj.__doc__, str) else ""
            text = _first_paragraphs(inspect.cleandoc(doc).split("\n\n"))
            if text is None or text in seen:
                continue
            seen.add(text)
            groups.setdefault(module_name, []).append({"text": f"{title}\n\n{text}"})
    return groups


DATA_SETS = {
    "shop": DataSet("chat", "examples/data (bundled)",
                    "a one-shop support chat: a customer question, a reply in the shop's house style"),
    "pydoc": DataSet("instruction", "pydoc_data.topics", "explain a section or documented name of the Python language reference "
                     "-> its first paragraphs", pydoc_groups),
    "stdlib-qa": DataSet("completion", "http, builtins, html.entities, unicodedata",
                         "a short factual question on the standard library (HTTP status, built-in, exception, "
                         "HTML entity, Unicode name) -> a short answer", stdlib_qa_groups),
    "stdlib-text": DataSet("text", "docstrings of 47 stdlib modules", "raw text to continue: a module's or a function's "
                           "docstring, headed by its dotted name", stdlib_text_groups),
}


def build(out_dir: Path) -> dict[str, dict]:
    """Return {name: {format, train, eval}} for the built sets; writes OUT/<name>/train.jsonl and eval.jsonl."""
    counts = {}
    for name, data_set in DATA_SETS.items():
        if data_set.groups is None:
            continue
        train, held = split(data_set.groups(), TRAIN_ROWS, EVAL_ROWS)
        if (len(train), len(held)) != (TRAIN_ROWS, EVAL_ROWS):
            raise ValueError(f"{name}: only {len(train)} train and {len(held)} eval rows, not {TRAIN_ROWS} and "
                             f"{EVAL_ROWS}; Python {platform.python_version()} has less usable text than the 3.11 this "
                             "was made on: lower MIN_CHARS or add sources")
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        for file, rows in (("train.jsonl", train), ("eval.jsonl", held)):
            (folder / file).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        counts[name] = {"format": data_set.format, "train": len(train), "eval": len(held)}
    return counts


def data_set_files(out_dir: Path) -> dict[str, tuple[Path, Path]]:
    """Return {name: (train file, eval file)} for all four sets; the built ones live under out_dir (see build)."""
    return {name: (EXAMPLES / "train.jsonl", EXAMPLES / "eval.jsonl") if data_set.groups is None
            else (Path(out_dir) / name / "train.jsonl", Path(out_dir) / name / "eval.jsonl")
            for name, data_set in DATA_SETS.items()}


def split(groups: dict[str, list[dict]], n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Return (train rows, eval rows), whole groups on each side, taken round-robin over the groups.

    Groups are visited in sorted order and one is held out whenever that keeps the held-out rows at
    no more than a fifth of the rows so far, so about a fifth of the rows land in eval however the
    group sizes vary. Different groups can still say the same thing (the reference documents break
    and continue in the same words), so an eval row that repeats much train text is dropped.
    """
    kept, held, seen, held_rows = [], [], 0, 0
    for key in sorted(groups):
        rows = groups[key]
        seen += len(rows)
        if (held_rows + len(rows)) * 5 <= seen:
            held.append(rows)
            held_rows += len(rows)
        else:
            kept.append(rows)
    train_runs = set().union(*(word_runs(row) for group in kept for row in group))
    held = [[row for row in group if not repeats(row, train_runs)] for group in held]
    return _round_robin(kept, n_train), _round_robin(held, n_eval)


def word_runs(row: dict, n: int = 8) -> set[tuple[str, ...]]:
    """Return the runs of n words in the row's answer or text (what training teaches; prompts are templated)."""
    words = re.findall(r"\w+", next(row[k] for k in ("output", "completion", "text") if k in row).lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def repeats(row: dict, runs: set[tuple[str, ...]]) -> bool:
    """Return whether more than a quarter of the row's 8-word runs are among `runs` (a near-copy)."""
    mine = word_runs(row)
    return len(mine & runs) * 4 > len(mine)


def _round_robin(groups: list[list[dict]], n: int) -> list[dict]:
    """Return up to n rows, one from each group in turn, so no group crowds out the others."""
    rows = [group[turn] for turn in range(max(map(len, groups), default=0)) for group in groups if turn < len(group)]
    return rows[:n]


def _spread(items: list, n: int) -> list:
    """Return n items evenly spaced over the list (all of them if it has no more than n)."""
    return items if len(items) <= n else [items[i * len(items) // n] for i in range(n)]


def _first_paragraphs(paragraphs: list[str]) -> str | None:
    """Return the leading paragraphs that fit in MAX_CHARS, or None when that is under MIN_CHARS."""
    kept: list[str] = []
    for paragraph in paragraphs:
        paragraph = paragraph.strip("\n").rstrip()
        if not paragraph.strip() or paragraph.startswith(("New in version", "Changed in version", "Deprecated since")):
            continue
        if len("\n\n".join(kept + [paragraph])) > MAX_CHARS:
            if not kept:  # one long paragraph: keep its whole sentences
                whole = re.match(r"(?s)(.*[.!?])\s", paragraph[:MAX_CHARS])
                kept = [whole.group(1)] if whole else []
            break
        kept.append(paragraph)
    while kept and kept[-1].endswith(":"):  # its example or grammar did not fit
        kept.pop()
    text = "\n\n".join(kept)
    return text if len(text) >= MIN_CHARS else None


def _unwrap(block: str) -> str:
    """Return a wrapped paragraph as one line ("User-\ndefined" becomes "User-defined")."""
    return " ".join(line.strip() for line in re.sub(r"(?<=\w-)\n\s*", "", block).splitlines() if line.strip())


def _first_sentence(doc: str | None) -> str | None:
    """Return a docstring's first sentence, skipping signature lines such as `iter(iterable) -> iterator`."""
    paragraphs = (" ".join(line.strip() for line in block.splitlines() if not SIGNATURE_LINE.search(line.strip()))
                  for block in (doc or "").split("\n\n"))
    text = next((p.strip() for p in paragraphs if p.strip()), "")
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return None if not sentence else sentence if sentence.endswith(".") else sentence + "."


SIGNATURE_LINE = re.compile(r"^(async )?[\w.]+\(.*\)$|->")


def main(argv: list[str] | None = None) -> None:
    """Build the sets into --out and print what each holds."""
    parser = argparse.ArgumentParser(prog="python -m peftkit.bench.tuning_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write <set>/train.jsonl and <set>/eval.jsonl into")
    args = parser.parse_args(argv)
    for name, count in build(args.out).items():
        print(f"{name}: {count['format']}, {count['train']} train + {count['eval']} eval rows -> {args.out / name}")


if __name__ == "__main__":
    main()
