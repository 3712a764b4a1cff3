"""The serving load benchmark's figures: each scenario's summary of its requests' timings, as a text or markdown table,
and the ratios issue #15 sets targets for."""
from __future__ import annotations

import math
import statistics

from peftkit.bench.naive_generate import Timing


def summarize(timings: list[Timing], wall: float, models: list[str], requests: int, unsent: int, errors: dict) -> dict:
    """Return throughput, p50/p99 of latency, TTFT and TPOT (seconds), and counts for one scenario's timings."""
    latency = [t.done - t.sent for t in timings]
    ttft = [t.first - t.sent for t in timings]
    tpot = [(t.last - t.first) / (t.tokens - 1) for t in timings if t.tokens > 1]
    tokens = sum(t.tokens for t in timings)
    # Request i goes to models[i % len(models)]: with fewer requests than models, only the first ones are asked.
    out = {"models": len(set(models[:requests])), "requests": requests, "ok": len(timings), "errors": errors, "unsent": unsent,
           "wall_s": wall, "requests_per_s": len(timings) / wall, "tokens_per_s": tokens / wall,
           "completion_tokens": tokens, "mean_s": statistics.fmean(latency) if latency else float("nan")}
    for key, values in (("", latency), ("ttft_", ttft), ("tpot_", tpot)):
        out[f"{key}p50_s"], out[f"{key}p99_s"] = percentile(values, 0.50), percentile(values, 0.99)
    return out


def percentile(values: list[float], q: float) -> float:
    """Return the q-quantile of values (nearest rank), nan when there are none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# (header, result key, seconds are shown in ms when True, digits after the point)
COLUMNS = [("req/s", "requests_per_s", False, 2), ("tok/s", "tokens_per_s", False, 1),
           ("TTFT p50 ms", "ttft_p50_s", True, 0), ("TTFT p99 ms", "ttft_p99_s", True, 0),
           ("TPOT p50 ms", "tpot_p50_s", True, 1), ("TPOT p99 ms", "tpot_p99_s", True, 1),
           ("p50 s", "p50_s", False, 2), ("p99 s", "p99_s", False, 2), ("rows/fwd", "batch_rows_mean", False, 2)]
HEADERS = ["scenario", "adapters", "ok", "errors"] + [c[0] for c in COLUMNS]


def table_rows(results: dict[str, dict]) -> list[list[str]]:
    """Return one row of formatted cells per scenario, in HEADERS order."""
    rows = []
    for label, r in results.items():
        cells = [label, str(r["models"]), str(r["ok"]), str(sum(r["errors"].values()) + r["unsent"])]
        for _, key, ms, digits in COLUMNS:
            value = r.get(key, math.nan) * (1000 if ms else 1)
            cells.append("n/a" if math.isnan(value) else f"{value:.{digits}f}")
        rows.append(cells)
    return rows


def text_table(results: dict[str, dict]) -> str:
    """Return the results as aligned plain-text columns."""
    rows = [HEADERS] + table_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    return "\n".join(" ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def markdown_table(results: dict[str, dict]) -> str:
    """Return the results as a markdown table (numbers right-aligned)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|---|" + "---:|" * (len(HEADERS) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Return the throughput ratios the issue sets targets for (mixed / single, peftkit / naive) and TTFT p50 ratios."""
    tok = {label: r["tokens_per_s"] for label, r in results.items() if r["ok"]}
    out = {}
    for label in tok:
        if label.startswith("mixed ") and "single" in tok:
            out[f"{label} / single tok/s"] = tok[label] / tok["single"]
    compared = [label for label in ("single", "mixed 8") if label in tok and "naive" in tok]
    for label in compared:
        out[f"peftkit {label} / naive tok/s"] = tok[label] / tok["naive"]
    for label in compared:  # above 1: peftkit's first token comes sooner
        out[f"naive / peftkit {label} TTFT p50"] = results["naive"]["ttft_p50_s"] / results[label]["ttft_p50_s"]
    if "mixed 8" in tok:  # what the prompt-prefix cache saves, and what --batch-invariant costs
        if "no prefix cache 8" in tok:
            out["no prefix cache / mixed 8 TTFT p50"] = (results["no prefix cache 8"]["ttft_p50_s"]
                                                         / results["mixed 8"]["ttft_p50_s"])
            out["mixed 8 / no prefix cache tok/s"] = tok["mixed 8"] / tok["no prefix cache 8"]
        if "batch-invariant 8" in tok:
            out["batch-invariant 8 / mixed 8 tok/s"] = tok["batch-invariant 8"] / tok["mixed 8"]
    return out


def ratio_lines(results: dict[str, dict]) -> list[str]:
    """Return one line per ratio, plus the TTFT p50 of the naive loop beside peftkit's."""
    lines = [f"{name}: {value:.2f}" for name, value in ratios(results).items()]
    if "naive" in results and results["naive"]["ok"]:
        ttft = ", ".join(f"{label} {results[label]['ttft_p50_s'] * 1000:.0f} ms" for label in ("naive", "single", "mixed 8")
                         if label in results and results[label]["ok"])
        lines.append(f"TTFT p50: {ttft} (every TTFT counts the wait for the server or the naive loop's lock)")
    return lines
