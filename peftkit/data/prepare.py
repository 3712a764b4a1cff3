"""prepare(): data settings + tokenizer -> tokenized, masked, optionally packed train and eval datasets.

Steps: read every source (rows tagged file:line), check each row against its format, hold out the
eval rows, repeat or subsample sources by weight, tokenize with loss masks, apply the length policy,
drop examples with nothing to train on, pack, and cache the result by fingerprint. Every count that
changes what trains (truncated, dropped, fully masked) lands in stats and in the log.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.config import CHOICES, DataConfig, peftkit_home
from peftkit.data import cache
from peftkit.data.errors import DataError
from peftkit.data.formats import FORMATS, Example, detect_format, rename_columns, to_example
from peftkit.data.masks import IGNORE, Encoded, encode_examples
from peftkit.data.packing import packed_rows
from peftkit.data.readers import Row, is_hub_dataset, read_rows
from peftkit.data.templates import resolve_template

log = logging.getLogger(__name__)
SOURCE_KEYS = ("path", "weight", "format", "columns", "split", "subset", "revision")


@dataclass
class PreparedData:
    """Tokenized datasets (columns input_ids, labels[, position_ids]), their stats and fingerprint."""

    train: Any
    eval: Any | None
    stats: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


@dataclass
class Source:
    """One training source after checking data.path / data.sources."""

    path: str
    weight: float = 1.0
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    subset: str | None = None
    revision: str | None = None
    """Hub revision; split, subset and revision matter only when path is a Hugging Face Hub dataset id."""


def prepare(cfg: DataConfig, tokenizer: Any, seed: int = 42, *, progress: bool = True, use_cache: bool = True) -> PreparedData:
    """Return the prepared train and eval data for these data settings, from the cache when it has them."""
    sources = resolve_sources(cfg)
    if cfg.length_policy not in CHOICES["data.length_policy"]:
        raise DataError(f"data.length_policy={cfg.length_policy!r} is unknown; choose truncate or drop")
    on_hub = {i for i, s in enumerate(sources) if not Path(s.path).exists() and is_hub_dataset(s.path)}
    files = [s.path for i, s in enumerate(sources) if i not in on_hub] + ([cfg.eval_path] if cfg.eval_path else [])
    for f in files:
        if not Path(f).exists():
            raise DataError(f"{f}: no such file or folder; check data.path / data.sources / data.eval_path "
                            f"(relative paths start from {Path.cwd()})")
    # A hub dataset is read once, here: its rows' digest stands in for a file's in the fingerprint.
    hub_rows = {i: _source_rows(sources[i], cfg) for i in sorted(on_hub)}
    template_file = cfg.chat_template if cfg.chat_template and Path(cfg.chat_template).is_file() else None
    # Paths stay out of the fingerprint (file contents are in it), so moved or renamed data keeps its identity.
    settings = {"sources": [{"weight": s.weight, "format": s.format, "columns": s.columns} for s in sources],
                "eval_file": bool(cfg.eval_path), "eval_fraction": cfg.eval_fraction, "system_prompt": cfg.system_prompt,
                "chat_template": cache.file_digest(template_file) if template_file else cfg.chat_template,
                "train_on_inputs": cfg.train_on_inputs, "max_seq_length": cfg.max_seq_length,
                "length_policy": cfg.length_policy, "packing": cfg.packing, "seed": seed}
    if hub_rows:  # only then, so fingerprints of file-only data stay what they were
        settings["hub_rows"] = {str(i): _rows_digest(rows) for i, rows in hub_rows.items()}
    fp = cache.fingerprint(files, tokenizer, settings)
    entry = cache.cache_entry(Path(cfg.cache_dir).expanduser() if cfg.cache_dir else peftkit_home() / "cache" / "data", fp)
    if use_cache and (hit := cache.load_cached(entry)) is not None:
        train, evaluation, stats = hit
        for source, known in zip(sources, stats["sources"]):
            known["path"] = source.path  # the same contents may now live elsewhere
        log.info("using cached tokenized data %s", entry)
        return PreparedData(train, evaluation, {**stats, "cached": True}, fp)

    train_ex, train_src, eval_ex, source_stats = _read_sources(sources, cfg, seed, hub_rows)
    template = None
    if any(e.messages is not None for e in train_ex + eval_ex):
        template = resolve_template(tokenizer, cfg.chat_template)
    encode = dict(template=template, system_prompt=cfg.system_prompt, train_on_inputs=cfg.train_on_inputs, progress=progress)
    train_kept, kept_idx, train_stats = _apply_limits(encode_examples(tokenizer, train_ex, desc="tokenizing train", **encode),
                                                      cfg.max_seq_length, cfg.length_policy)
    if not train_kept:
        raise DataError(_nothing_left(train_stats, cfg))
    for i, s in enumerate(source_stats):
        s["examples"] = sum(1 for k in kept_idx if train_src[k] == i)
    eval_kept, eval_stats = [], None
    if eval_ex:
        eval_kept, _, eval_stats = _apply_limits(encode_examples(tokenizer, eval_ex, desc="tokenizing eval", **encode),
                                                 cfg.max_seq_length, cfg.length_policy)
        eval_stats["rows"] = len(eval_ex)
    train_ds, packed = _to_dataset(train_kept, cfg, seed)
    eval_ds = _to_dataset(eval_kept, cfg, seed)[0] if eval_kept else None
    stats = {"rows": sum(s["rows"] for s in source_stats), **train_stats, "packed_sequences": packed,
             "packing_efficiency": round(train_stats["tokens"] / (packed * cfg.max_seq_length), 4) if packed else None,
             "max_seq_length": cfg.max_seq_length, "length_policy": cfg.length_policy,
             "template": template.source if template else None, "sources": source_stats,
             "eval": eval_stats, "fingerprint": fp, "cached": False}
    _log_counts("train", train_stats)
    if eval_stats:
        _log_counts("eval", eval_stats)
    if use_cache:
        cache.save_cached(entry, train_ds, eval_ds, stats)
    return PreparedData(train_ds, eval_ds, stats, fp)


def resolve_sources(cfg: DataConfig) -> list[Source]:
    """Return the training sources from data.path or data.sources, checked."""
    if cfg.path and cfg.sources:
        raise DataError("both data.path and data.sources are set; use data.path for one file or data.sources "
                        "for several, not both")
    if cfg.format != "auto" and cfg.format not in FORMATS:
        raise DataError(f"data.format={cfg.format!r} is unknown; choose one of auto, {', '.join(FORMATS)}")
    if cfg.path:
        return [Source(cfg.path, 1.0, cfg.format, dict(cfg.columns), cfg.split, cfg.subset, cfg.revision)]
    if not cfg.sources:
        raise DataError("no training data: set data.path (e.g. --set data.path=train.jsonl) or data.sources")
    out = []
    for i, raw in enumerate(cfg.sources):
        at = f"data.sources[{i}]"
        if not isinstance(raw, dict) or "path" not in raw:
            raise DataError(f"{at} must be a mapping with at least a path, e.g. {{path: chat.jsonl, weight: 2}}")
        unknown = sorted(set(raw) - set(SOURCE_KEYS))
        if unknown:
            raise DataError(f"{at} has unknown key {unknown[0]!r}; use {', '.join(SOURCE_KEYS)}")
        weight = raw.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise DataError(f"{at}.weight={weight!r} must be a number above 0 (2 repeats each row twice, 0.5 takes half)")
        fmt = raw.get("format", cfg.format)
        if fmt != "auto" and fmt not in FORMATS:
            raise DataError(f"{at}.format={fmt!r} is unknown; choose one of auto, {', '.join(FORMATS)}")
        columns = raw.get("columns", cfg.columns) or {}
        if not isinstance(columns, dict):
            raise DataError(f"{at}.columns must be a mapping such as {{question: instruction}}, got {type(columns).__name__}")
        out.append(Source(str(raw["path"]), float(weight), fmt, dict(columns), str(raw.get("split", cfg.split)),
                          raw.get("subset", cfg.subset), raw.get("revision", cfg.revision)))
    return out


def held_out_examples(cfg: DataConfig, seed: int = 42) -> list[Example]:
    """Return the examples prepare() holds out for evaluation with these settings and seed (before tokenizing)."""
    return _read_sources(resolve_sources(cfg), cfg, seed)[2]


def read_examples(path: str, fmt: str, columns: dict[str, str], rows: list[Row] | None = None) -> tuple[list[Example], str]:
    """Return a file's rows (or the rows given) as checked examples, and the format used (detected from the first row for auto)."""
    rows = read_rows(path) if rows is None else rows
    if fmt == "auto":
        fmt = detect_format(rename_columns(rows[0].fields, columns), rows[0].where)
    return [to_example(r, fmt, columns) for r in rows], fmt


def _source_rows(s: Source, cfg: DataConfig) -> list[Row]:
    """Return a source's rows: a file or folder, or a split of a Hugging Face Hub dataset."""
    return read_rows(s.path, split=s.split, subset=s.subset, revision=s.revision, offline=cfg.offline)


def _rows_digest(rows: list[Row]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row.fields, sort_keys=True, default=str).encode() + b"\n")
    return h.hexdigest()


def _read_sources(sources: list[Source], cfg: DataConfig, seed: int, hub_rows: dict[int, list[Row]] | None = None):
    rng = random.Random(seed)
    train: list[Example] = []
    train_src: list[int] = []  # source index of each training example, for per-source counts
    held: list[Example] = []
    stats = []
    for index, s in enumerate(sources):
        rows = (hub_rows or {}).get(index) or _source_rows(s, cfg)
        examples, fmt = read_examples(s.path, s.format, s.columns, rows)
        n_eval = 0 if cfg.eval_path else int(round(len(examples) * cfg.eval_fraction))
        if n_eval >= len(examples):
            n_eval = 0  # never hold out everything; a one-row file trains on its row
        held_idx = set(rng.sample(range(len(examples)), n_eval))
        kept = [e for i, e in enumerate(examples) if i not in held_idx]
        held.extend(e for i, e in enumerate(examples) if i in held_idx)
        # Weight 2.6 = every row twice plus a seeded 60% of the rows once more.
        whole, part = int(s.weight), s.weight - int(s.weight)
        weighted = kept * whole + rng.sample(kept, int(round(part * len(kept))))
        train.extend(weighted)
        train_src.extend([index] * len(weighted))
        stats.append({"path": s.path, "format": fmt, "weight": s.weight, "rows": len(examples),
                      "train_rows": len(kept), "eval_rows": n_eval, "weighted_rows": len(weighted)})
    if cfg.eval_path:
        held, _ = read_examples(cfg.eval_path, cfg.format, dict(cfg.columns))
    return train, train_src, held, stats


def _apply_limits(encoded: list[Encoded], max_len: int, policy: str) -> tuple[list[Encoded], list[int], dict[str, Any]]:
    """Return the examples that will train (length policy applied, fully masked removed), their indices and counts."""
    kept: list[Encoded] = []
    kept_idx: list[int] = []
    skipped: dict[str, list[str]] = {"truncated": [], "dropped": [], "fully_masked": []}
    counts = {"truncated": 0, "dropped": 0, "fully_masked": 0}
    for index, e in enumerate(encoded):
        if len(e.input_ids) > max_len:
            key = "dropped" if policy == "drop" else "truncated"
            counts[key] += 1
            if len(skipped[key]) < 5:
                skipped[key].append(e.where)
            if policy == "drop":
                continue
            e = Encoded(e.where, e.input_ids[:max_len], e.labels[:max_len])
        if all(label == IGNORE for label in e.labels):
            counts["fully_masked"] += 1
            if len(skipped["fully_masked"]) < 5:
                skipped["fully_masked"].append(e.where)
            continue
        kept.append(e)
        kept_idx.append(index)
    tokens = sum(len(e.input_ids) for e in kept)
    trained = sum(sum(1 for label in e.labels if label != IGNORE) for e in kept)
    return kept, kept_idx, {"examples": len(kept), "tokens": tokens, "trained_tokens": trained,
                  "trained_share": round(trained / tokens, 4) if tokens else 0.0, **counts,
                  "max_length": max((len(e.input_ids) for e in kept), default=0),
                  "mean_length": round(tokens / len(kept), 1) if kept else 0.0, "skipped": skipped}


def _to_dataset(kept: list[Encoded], cfg: DataConfig, seed: int):
    import datasets

    if cfg.packing:
        cols = packed_rows([(e.input_ids, e.labels) for e in kept], cfg.max_seq_length, seed)
        return datasets.Dataset.from_dict(cols), len(cols["input_ids"])
    return datasets.Dataset.from_dict({"input_ids": [e.input_ids for e in kept], "labels": [e.labels for e in kept]}), 0


def _nothing_left(stats: dict[str, Any], cfg: DataConfig) -> str:
    where = stats["skipped"]["fully_masked"][:1] or stats["skipped"]["dropped"][:1]
    return (f"no examples left to train on: {stats['dropped']} dropped as longer than data.max_seq_length="
            f"{cfg.max_seq_length}, {stats['fully_masked']} had no trained tokens (all labels masked, "
            f"e.g. {where[0] if where else 'n/a'}); raise data.max_seq_length, use data.length_policy=truncate, "
            "or check that the assistant turns are not cut off")


def _log_counts(split: str, stats: dict[str, Any]) -> None:
    log.info("%s: %d examples, %d tokens, %.1f%% trained", split, stats["examples"], stats["tokens"], 100 * stats["trained_share"])
    for key, what in (("truncated", "cut to data.max_seq_length"), ("dropped", "dropped as too long"),
                      ("fully_masked", "skipped with no trained tokens")):
        if stats[key]:
            log.warning("%s: %d examples %s (e.g. %s)", split, stats[key], what, ", ".join(stats["skipped"][key][:3]))
