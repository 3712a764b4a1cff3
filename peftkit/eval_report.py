"""The evaluation report in words: a base-vs-adapter table, the forgetting figure and example answers."""
from __future__ import annotations

import textwrap
from typing import Any

# metric key -> (label, how a value prints, whether a difference is in percentage points)
ROWS = (
    ("loss", "answer loss", "{:.4f}", False),
    ("perplexity", "answer perplexity", "{:.3f}", False),
    ("token_accuracy", "answer token accuracy", "{:.1%}", True),
    ("exact_match", "exact match", "{:.1%}", True),
    ("rouge_l", "ROUGE-L F1", "{:.1%}", True),
    ("chrf", "chrF", "{:.1%}", True),
)


def format_report(report: dict[str, Any], *, width: int = 100) -> str:
    """Return the report as the table `peftkit eval` prints, then the forgetting line and example answers."""
    scores = report["scores"]
    sides = [s for s in ("base", "adapter") if s in scores]
    head = f"{'metric':<24}" + "".join(f"{s:>12}" for s in sides) + (f"{'difference':>14}" if len(sides) == 2 else "")
    lines = [f"{report.get('adapter') or report['base_model']} on {report['data']}: {report['cases']} examples",
             "", head, "-" * len(head)]
    for key, label, fmt, points in ROWS:
        values = [scores[s].get(key) for s in sides]
        if all(v is None for v in values):
            continue
        row = f"{label:<24}" + "".join(f"{_fmt(v, fmt):>12}" for v in values)
        if len(values) == 2 and None not in values:
            diff = values[1] - values[0]
            row += f"{(f'{100 * diff:+.1f} pts' if points else f'{diff:+.4f}'):>14}"
        lines.append(row)
    lines += _forgetting_lines(report.get("forgetting"))
    for i, ex in enumerate(report.get("examples") or [], 1):
        lines += ["", f"example {i}: {_short(ex['prompt'], width)}", f"  reference: {_short(ex['reference'], width)}"]
        lines += [f"  {side + ':':<10} {_short(ex[side], width)}" for side in sides if side in ex]
    lines += ["", f"({report['seconds']:.0f} s)"]
    return "\n".join(lines)


def card_section(report: dict[str, Any]) -> str:
    """Return the report as a markdown section for an adapter's model card."""
    return "## Evaluation\n```\n" + format_report(report) + "\n```\n"


def _forgetting_lines(f: dict[str, Any] | None) -> list[str]:
    if not f:
        return []
    line = f"general-text loss: base {_fmt(f.get('base_loss'), '{:.4f}')}"
    if f.get("adapter_loss") is not None:
        line += f", adapter {f['adapter_loss']:.4f} ({f['relative_change']:+.1%} against the base)"
    return ["", f"forgetting check on {f['texts']} passages of {f['source']}:", "  " + line]


def _fmt(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def _short(text: str | None, width: int) -> str:
    return textwrap.shorten(" ".join((text or "").split()), width=width, placeholder=" ...") or "(empty)"
