"""`peftkit compare`: train each method on the same data and budget, then tabulate and chart what each cost.

Each method trains in its own `python -m peftkit train` process, so peak memory is that
method's alone and no method warms caches for the next. The Llama 3.1 8B figures come from
`methods.footprint`: exact counts on the meta device, nothing downloaded.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from peftkit import atomic
from peftkit.config import MethodConfig, load_config, save_config
from peftkit.methods.catalog import CATALOG, FULL, METHOD_NAMES
from peftkit.presets import CONFIGS

# Every method but DoRA, which `lora` measures already as an option (method.use_dora).
DEFAULT_METHODS = tuple(name for name in METHOD_NAMES if name != "dora")
# Learning rates for methods whose usual range is far from LoRA's (the LoRA family keeps the config's).
METHOD_LR = {m.name: m.learning_rate for m in CATALOG.values() if m.learning_rate is not None}
PRESETS = CONFIGS / "llama-3.1-8b"
ADAPTER_FILES = ("adapter_config.json", "config.json", "*.safetensors", "*.safetensors.index.json")  # config.json: full only


@dataclass
class MethodRun:
    """One method's training run: where it went, what it measured, or why it failed."""

    method: str
    settings: str
    """The settings that size the method, in words (see describe)."""
    learning_rate: float | str
    """The configured rate: a number, or auto (the range test's choice is in metrics)."""
    run_dir: Path
    metrics: dict | None = None
    """The run's metrics.json; None until it trained."""
    adapter_bytes: int | None = None
    error: str | None = None
    """Why the run failed (its exit code and last log lines); None when it trained."""


@dataclass
class Comparison:
    runs: list[MethodRun]
    table: Path
    chart: Path
    footprints: list = field(default_factory=list)


def compare(config_path: str | Path, methods: list[str], *, overrides: list[str] | None = None,
            out_dir: str | Path = "runs/compare", learning_rates: dict[str, float] | None = None,
            command: str | None = None) -> Comparison:
    """Return the comparison of methods trained from config_path; writes OUT/methods.md and OUT/methods.png."""
    from peftkit.methods import MethodError

    unknown = [m for m in methods if m not in CATALOG]
    if unknown or not methods:
        raise MethodError(f"--methods {','.join(methods)}: {', '.join(unknown) or 'empty'} is not a method; "
                          f"choose from {', '.join(METHOD_NAMES)}")
    overrides = list(overrides or [])
    auto = load_config(config_path, overrides).train.learning_rate == "auto"  # every method searches its own
    rates = {**({} if auto else METHOD_LR), **(learning_rates or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans = []
    for method in methods:  # check every config before spending minutes on the first run
        extra = [f"method.name={method}", f"train.output_dir={out / method}"]
        if method in rates:
            extra.append(f"train.learning_rate={rates[method]}")
        plans.append((method, load_config(config_path, overrides + extra)))
    runs = []
    for method, cfg in plans:
        # The resolved config is frozen per method, so an edit to CONFIG during a long comparison changes nothing.
        frozen = out / f"{method}.yaml"
        save_config(cfg, frozen)
        run = MethodRun(method, describe(cfg.method), cfg.train.learning_rate, out / method)
        run_method(frozen, run, log_file=out / f"{method}.log")
        runs.append(run)
    footprints = llama_8b_footprints(methods)
    table = out / "methods.md"
    atomic.write_text(table, report(runs, footprints, command=command, budget=plans[0][1].train))
    chart = out / "methods.png"
    write_chart(runs, chart)
    return Comparison(runs=runs, table=table, chart=chart, footprints=footprints)


def run_method(config_file: Path, run: MethodRun, *, log_file: Path) -> None:
    """Train one method in a fresh `python -m peftkit train` process and fill run with its results."""
    cmd = [sys.executable, "-m", "peftkit", "train", str(config_file), "--no-register"]
    print(f"== {run.method}: {run.settings}, lr {run.learning_rate}", flush=True)
    with open(log_file, "w", encoding="utf-8") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics_file = run.run_dir / "metrics.json"
    if done.returncode != 0 or not metrics_file.is_file():
        tail = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        run.error = f"exit {done.returncode}: " + " / ".join(tail) + f" (full log: {log_file})"
        print(f"   failed: {run.error}", flush=True)
        return
    run.metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    run.adapter_bytes = adapter_bytes(run.run_dir / "adapter")


def adapter_bytes(adapter_dir: Path) -> int:
    """Return the bytes of an adapter's config and weights (the tokenizer copy, model card and lineage left out)."""
    files = {p for pattern in ADAPTER_FILES for p in Path(adapter_dir).glob(pattern)}
    return sum(p.stat().st_size for p in files)


def describe(m: MethodConfig) -> str:
    """Return the settings that size a method, in a few words (e.g. 'rank 16, attention')."""
    from peftkit.methods import ia3

    targets = m.target_modules if isinstance(m.target_modules, str) else "[" + ", ".join(m.target_modules) + "]"
    if "LORA" in CATALOG[m.name].peft_types:
        extras = [x for x, on in (("DoRA", m.use_dora and m.name != "dora"), ("rsLoRA", m.use_rslora)) if on]
        return ", ".join([f"rank {m.rank}, alpha {m.alpha:g}, {targets}"] + extras)
    if m.name == "prefix":
        return f"{m.num_virtual_tokens} virtual tokens" + (", MLP reparameterized" if m.prefix_projection else "")
    if m.name == "prompt":
        return f"{m.num_virtual_tokens} virtual tokens" + (", text init" if m.prompt_init_text else "")
    if m.name == "ia3":
        return "scales " + ", ".join(ia3.targets(m.target_modules)[0])
    if m.name == "bottleneck":
        return f"reduction {m.reduction_factor}, after {m.adapter_placement}"
    return "every weight"


def preset_method(method: str) -> MethodConfig:
    """Return the method section the 8B presets give: configs/llama-3.1-8b/METHOD.yaml, else lora.yaml's with the name swapped."""
    preset = PRESETS / f"{method}.yaml"
    if not preset.is_file():
        preset = PRESETS / "lora.yaml"
    if not preset.is_file():
        return MethodConfig(name=method, target_modules="all-linear")
    # Packing only shapes the data; it is switched off so prefix and prompt (which refuse it) read the same preset.
    return load_config(preset, [f"method.name={method}", "data.packing=false"]).method


def llama_8b_footprints(methods: list[str]) -> list:
    """Return the exact footprint of each method on Llama 3.1 8B under its preset."""
    from peftkit.methods.footprint import measure

    return [(describe(cfg), measure(cfg)) for cfg in (preset_method(m) for m in methods)]


# ---------------------------------------------------------------- report

def report(runs: list[MethodRun], footprints: list, *, command: str | None, budget) -> str:
    """Return methods.md: the measured table, the machine, and the 8B table."""
    lines = ["# Method comparison", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += [f"Machine: {machine(runs)}.", f"Budget per method: {budget_words(budget)}.", "", measured_table(runs), "",
              "## Llama 3.1 8B under each method's preset (exact, computed on the meta device)", "",
              footprint_table(footprints), ""]
    return "\n".join(lines)


def measured_table(runs: list[MethodRun]) -> str:
    """Return the markdown table of measured runs (failed runs keep their row with the error)."""
    head = ("| method | settings | lr | trainable params | % of base | adapter on disk | peak memory | tokens/s "
            "| train loss (first → last) | eval loss | eval token accuracy | wall time |\n"
            "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    rows = [head]
    for r in runs:
        if r.metrics is None:
            error = (r.error or "").replace("|", "/")  # a bar inside a cell would split the row
            rows.append(f"| {r.method} | {r.settings} | {rate_cell(r)} | failed: {error} |" + " |" * 8)
            continue
        m = r.metrics
        rows.append(
            f"| {r.method} | {r.settings} | {rate_cell(r)} | {m['trainable_parameters']:,} | {base_percent(r):.3g}% "
            f"| {human_bytes(r.adapter_bytes)} | {m['peak_memory_mb']:,.0f} MiB | {_num(m['tokens_per_second'], '.0f')} "
            f"| {_num(m.get('train_loss_first'), '.3f')} → {_num(m['train_loss'], '.3f')} | {_num(m['eval_loss'], '.3f')} "
            f"| {_percent(m.get('eval_token_accuracy'))} | {m['wall_time_s']:.0f} s |")
    return "\n".join(rows)


def rate_cell(r: MethodRun) -> str:
    """Return the lr column: the fixed rate, or auto with the rate its range test chose."""
    if r.learning_rate != "auto":
        return f"{r.learning_rate:g}"
    chosen = (r.metrics or {}).get("learning_rate")
    return f"auto → {chosen:.3g}" if chosen is not None else "auto"


def footprint_table(footprints: list) -> str:
    """Return the markdown table of 8B footprints: trainable parameters, saved bytes, base weights."""
    rows = ["| method | preset settings | trainable params | % of base | adapter tensors saved | saved dtype | base weights held |",
            "|---|---|--:|--:|--:|---|--:|"]
    for settings, f in footprints:
        rows.append(f"| {f.method} | {settings} | {f.trainable:,} | {f.percent:.4g}% | {f.saved_bytes:,} B ({human_bytes(f.saved_bytes)}) "
                    f"| {f.saved_dtypes} | {human_bytes(f.base_bytes)}{' (NF4)' if CATALOG[f.method].quantized_base else ''} |")
    return "\n".join(rows)


def base_percent(run: MethodRun) -> float:
    """Return trainable parameters as a percentage of the base model's (adapters are not part of the base)."""
    m = run.metrics
    base = m["total_parameters"] if run.method == FULL else m["total_parameters"] - m["trainable_parameters"]
    return 100 * m["trainable_parameters"] / base


def write_chart(runs: list[MethodRun], path: Path) -> None:
    """Draw one bar panel per measure (parameters, size, memory, speed, losses) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in runs if r.metrics is not None]
    panels = [("trainable % of base (log)", lambda r: base_percent(r), True),
              ("adapter on disk, MiB (log)", lambda r: r.adapter_bytes / 2**20, True),
              ("peak memory, MiB", lambda r: r.metrics["peak_memory_mb"], False),
              ("tokens per second", lambda r: r.metrics["tokens_per_second"] or 0, False),
              ("eval token accuracy, %", lambda r: 100 * (r.metrics.get("eval_token_accuracy") or 0), False),
              ("eval loss", lambda r: r.metrics["eval_loss"] or 0, False)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    names = [r.method for r in done]
    colors = [plt.cm.tab10(i % 10) for i in range(len(done))]
    for ax, (title, value, log) in zip(axes.flat, panels):
        values = [value(r) for r in done]
        ax.bar_label(ax.bar(names, values, color=colors), fmt="%.4g", fontsize=8)  # exact values on the bars
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=45)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def machine(runs: list[MethodRun]) -> str:
    """Return the CPU or GPU, core count, torch version and the torch threads the runs used, in words."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or "CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # Each method trains in its own process; what counts is the thread count those processes used.
    used = sorted({r.metrics["torch_threads"] for r in runs if r.metrics and r.metrics.get("torch_threads")})
    threads = f", {'/'.join(map(str, used))} torch thread{'s' * (used != [1])} per run" if used else ""
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, no GPU, torch {torch.__version__}{threads}"


def budget_words(t) -> str:
    """Return the shared training budget in words."""
    steps = f"{t.max_steps} optimizer steps" if t.max_steps > 0 else f"{t.epochs:g} epochs"
    return f"{steps} of batch {t.batch_size} x {t.gradient_accumulation_steps} accumulation, seed {t.seed}"


def human_bytes(n: int | None) -> str:
    """Return a byte count in B, KiB, MiB or GiB with four significant digits."""
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"
