"""The `peftkit data inspect` report: counts, a length histogram, and examples with trained tokens marked."""
from __future__ import annotations

from typing import Any

from peftkit.data.masks import IGNORE
from peftkit.data.packing import split_packed
from peftkit.data.prepare import PreparedData

GREEN, RESET = "\x1b[1;32m", "\x1b[0m"
OPEN, CLOSE = "[[", "]]"  # marks trained text when colour is off (files, pipes, CI logs)


def build_report(prepared: PreparedData, tokenizer: Any, n: int = 3, color: bool = False) -> str:
    """Return the inspect report as text: sources, counts, a length histogram and the first n examples."""
    s = prepared.stats
    lines = [f"fingerprint  {prepared.fingerprint}{'  (cached)' if s.get('cached') else ''}",
             f"template     {s.get('template') or 'none (text only)'}", "", "sources"]
    for src in s["sources"]:
        lines.append(f"  {src['path']}  format={src['format']} weight={src['weight']:g}  rows={src['rows']} "
                     f"train={src['train_rows']} eval={src['eval_rows']} examples={src['examples']}")
    lines += ["", f"rows         {s['rows']} read from {len(s['sources'])} source(s)", _counts("train", s)]
    if s.get("packed_sequences"):
        lines.append(f"  packed into {s['packed_sequences']} sequences of up to {s['max_seq_length']} tokens "
                     f"({100 * s['packing_efficiency']:.1f}% filled)")
    if s.get("eval"):
        lines.append(_counts("eval", s["eval"]))
    else:
        lines.append("eval         none (set data.eval_fraction or data.eval_path)")
    examples = list(_examples(prepared.train))
    lines += ["", f"example lengths in tokens (train, limit {s['max_seq_length']}, policy {s['length_policy']})"]
    lines += histogram([len(ids) for ids, _ in examples], s["max_seq_length"])
    legend = "trained tokens in green" if color else f"trained tokens between {OPEN} and {CLOSE}"
    lines += ["", f"first {min(n, len(examples))} training examples ({legend}; everything else is context only)"]
    for k, (ids, labels) in enumerate(examples[:n], start=1):
        trained = sum(1 for label in labels if label != IGNORE)
        lines += ["", f"--- example {k}: {len(ids)} tokens, {trained} trained ---", highlight(tokenizer, ids, labels, color)]
    return "\n".join(lines)


def histogram(lengths: list[int], limit: int, bins: int = 8, width: int = 40) -> list[str]:
    """Return text rows of a length histogram from 0 to the length limit."""
    if not lengths:
        return ["  (no examples)"]
    step = max(1, -(-limit // bins))
    counts = [0] * bins
    for length in lengths:
        counts[min((length - 1) // step, bins - 1)] += 1
    top = max(counts)
    return [f"  {i * step + 1:>6}-{min((i + 1) * step, limit):<6} {'#' * round(width * c / top):<{width}} {c}"
            for i, c in enumerate(counts)]


def highlight(tokenizer: Any, ids: list[int], labels: list[int], color: bool) -> str:
    """Return the decoded example with runs of trained tokens marked (green, or between [[ and ]])."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            text = tokenizer.decode(ids[start:i])
            if labels[start] != IGNORE:
                text = f"{GREEN}{text}{RESET}" if color else f"{OPEN}{text}{CLOSE}"
            out.append(text)
            start = i
    return "".join(out)


def _counts(name: str, s: dict[str, Any]) -> str:
    return (f"{name:<12} {s['examples']} examples, {s['tokens']} tokens, {s['trained_tokens']} trained "
            f"({100 * s['trained_share']:.1f}%); truncated {s['truncated']}, dropped {s['dropped']}, "
            f"fully masked {s['fully_masked']}")


def _examples(dataset):
    """Yield (input_ids, labels) per example, unpacking packed rows at their position_ids restarts."""
    packed = "position_ids" in dataset.column_names
    for row in dataset:
        if not packed:
            yield row["input_ids"], row["labels"]
            continue
        for start, end in split_packed(row["position_ids"]):
            yield row["input_ids"][start:end], row["labels"][start:end]
