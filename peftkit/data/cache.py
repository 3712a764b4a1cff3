"""Fingerprints of data + tokenizer + settings, and the on-disk cache of tokenized datasets they key.

The same files, tokenizer and data settings give the same fingerprint, so a second run (or
`peftkit data inspect` before `peftkit train`) reuses the tokenized data instead of rebuilding it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Bump when tokenization or masking changes what a fingerprint's data looks like.
PIPELINE_VERSION = 1


def file_digest(path: str | Path) -> str:
    """Return the sha256 hex digest of a file, or of every file in a folder (names included)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """Return a sha256 hex digest of everything about a tokenizer that changes token ids or templates."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {"class": type(tokenizer).__name__, "bos": tokenizer.bos_token, "eos": tokenizer.eos_token,
             # The pad token is left out: padding happens in the collator, never in the cached data.
             "special": sorted(set(map(str, tokenizer.all_special_tokens)) - {str(tokenizer.pad_token)}),
             "added": sorted(tokenizer.get_added_vocab().items()),
             "chat_template": getattr(tokenizer, "chat_template", None)}
    return hashlib.sha256(body.encode() + json.dumps(extra, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(files: list[str | Path], tokenizer: Any, settings: dict[str, Any]) -> str:
    """Return "sha256:<hex>" over the data files' contents, the tokenizer and the data settings."""
    record = {"version": PIPELINE_VERSION, "files": [file_digest(f) for f in files],
              "tokenizer": tokenizer_digest(tokenizer), "settings": settings}
    return "sha256:" + hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def cache_entry(root: Path, fp: str) -> Path:
    """Return the cache folder for a fingerprint."""
    return root / fp.split(":", 1)[1]


def load_cached(entry: Path):
    """Return (train, eval, stats) from a cache folder, or None when it is not there (or unreadable)."""
    if not (entry / "stats.json").is_file():
        return None
    import datasets

    try:
        train = datasets.load_from_disk(str(entry / "train"))
        evaluation = datasets.load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
        stats = json.loads((entry / "stats.json").read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - a damaged entry is rebuilt, never trusted
        log.warning("ignoring damaged data cache %s (%s); rebuilding", entry, exc)
        return None
    return train, evaluation, stats


def save_cached(entry: Path, train, evaluation, stats: dict[str, Any]) -> None:
    """Write a cache folder atomically: build it under a temporary name, then rename it into place."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name[:16]}-", dir=entry.parent))
    except OSError as exc:
        log.warning("cannot write the data cache under %s (%s); continuing without it", entry.parent, exc)
        return
    import datasets

    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # saving takes a moment; its bars would only bury our counts
    try:
        train.save_to_disk(str(tmp / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(tmp / "eval"))
        # stats.json last: its presence marks a complete entry.
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
        os.rename(tmp, entry)
    except OSError as exc:
        if not entry.exists():  # another process winning the race is fine; anything else is worth a warning
            log.warning("could not cache tokenized data at %s (%s)", entry, exc)
    finally:
        if not quiet:
            datasets.enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)
