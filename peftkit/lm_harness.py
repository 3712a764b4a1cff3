"""`peftkit eval --lm-eval TASKS`: lm-evaluation-harness benchmarks on the base and the adapter, side by side.

lm_eval's own `hf` backend loads and scores both models, so the numbers are the harness's,
comparable with any published lm_eval figure. peftkit only resolves what to load (a registry
reference to its adapter folder, a bundled GGUF alias to a local HF folder), lines the two
runs up and writes them to JSON. A stock-peft adapter reaches lm_eval as `peft=FOLDER` over
the base; a full fine-tune is the model itself. lm_eval is an optional dependency.
"""
from __future__ import annotations

import difflib
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

INSTALL = 'pip install "peftkit[lm-eval]"'
DEFAULT_BASE = "smollm2-135m-instruct"  # what generate.load_session falls back to when nothing is recorded


@dataclass
class HarnessSettings:
    """What to run and how much: the --lm-eval flags of `peftkit eval`."""

    tasks: list[str]
    """lm_eval task, group or tag names (or task YAML files)."""
    include: str | None = None
    """A folder of custom task YAMLs, scanned as lm_eval's TaskManager(include_path=...)."""
    limit: int | None = None
    """Evaluate only the first N documents of each task."""
    batch_size: int = 8


def import_lm_eval():
    """Return the lm_eval module, or say how to install it."""
    try:
        import lm_eval
    except ImportError as exc:
        raise PeftkitError(f"--lm-eval needs lm-evaluation-harness, which is not installed: {INSTALL}") from exc
    return lm_eval


def parse_tasks(text: str) -> list[str]:
    """Return the task names of a comma-separated --lm-eval value."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise PeftkitError(f"--lm-eval={text!r} names no task; pass e.g. --lm-eval hellaswag,arc_easy")
    return tasks


def load_task_manager(tasks: list[str], include: str | None = None):
    """Return a TaskManager that knows every task named, or raise naming the unknown ones and how to list tasks."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    if include:
        if not Path(include).expanduser().is_dir():
            raise PeftkitError(f"--lm-eval-include={include!r}: no such folder; point it at a folder of task YAMLs")
        include = str(Path(include).expanduser())
        # lm_eval's own index is about 15,000 YAML files (seconds to scan): skip it when the folder has them all
        local = TaskManager(include_path=include, include_defaults=False)
        if all(_known(local, t) for t in tasks):
            return local
    manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if not _known(manager, t)]
    if unknown:
        near = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        named = "; ".join(f"{t!r}" + (f" (did you mean {', '.join(near[t])}?)" if near[t] else "") for t in unknown)
        listing = "lm-eval ls tasks" + (f" --include_path {include}" if include else "")
        raise PeftkitError(f"--lm-eval: unknown task {named}; `{listing}` lists the tasks lm_eval knows"
                           + ("" if include else ", and --lm-eval-include FOLDER adds your own task YAMLs"))
    return manager


def _known(manager, name: str) -> bool:
    return name in manager.all_tasks or (Path(name).suffix in (".yaml", ".yml") and Path(name).is_file())


def model_args(adapter_dir: Path | None, base_dir: Path) -> dict[str, dict[str, Any]]:
    """Return HFLM's loading arguments per side: the base folder, and the adapter as peft= or as the model itself."""
    from peftkit.methods import loader_for, read_adapter_config
    from peftkit.methods.full import is_full_finetune

    # one tokenizer for both sides, as `peftkit eval` does: the adapter's own when it saved one
    tokenizer = str(adapter_dir if adapter_dir and (adapter_dir / "tokenizer_config.json").is_file() else base_dir)
    sides = {"base": {"pretrained": str(base_dir), "tokenizer": tokenizer}}
    if adapter_dir is None:
        return sides
    if is_full_finetune(adapter_dir):
        sides["adapter"] = {"pretrained": str(adapter_dir), "tokenizer": tokenizer}
        return sides
    peft_type = str(read_adapter_config(adapter_dir).get("peft_type", ""))
    if loader_for(peft_type) is not None:
        raise PeftkitError(f"{adapter_dir}: a {peft_type} adapter is read back by peftkit's own loader, which "
                           "lm_eval's hf backend does not call; --lm-eval runs stock-peft adapters (LoRA, DoRA, "
                           "IA3, LoHa, ...) and full fine-tunes. Use `peftkit eval` without --lm-eval for this one")
    sides["adapter"] = {"pretrained": str(base_dir), "peft": str(adapter_dir), "tokenizer": tokenizer}
    return sides


def evaluate_side(args: dict[str, Any], manager, settings: HarnessSettings, *, dtype, device: str) -> dict[str, Any]:
    """Return lm_eval's simple_evaluate output for one model (its per-task results and sample counts)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(**args, dtype=dtype, device=device, batch_size=settings.batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=list(settings.tasks), task_manager=manager, limit=settings.limit,
                              log_samples=False)
    finally:
        del lm
        gc.collect()  # the next side loads a second copy of the base
    return {"results": out["results"], "n-samples": out.get("n-samples", {})}


def score_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Return one row per task and metric (stderrs left out): task, metric, base, adapter, difference."""
    base = results["base"]["results"]
    tuned = results.get("adapter", {}).get("results")
    rows = []
    for task, metrics in base.items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key or "," not in key:
                continue
            name, filt = key.split(",", 1)
            row = {"task": task, "metric": name if filt == "none" else f"{name} ({filt})", "base": value}
            if tuned is not None:
                other = (tuned.get(task) or {}).get(key)
                row["adapter"] = other
                row["difference"] = None if other is None else other - value
            rows.append(row)
    return rows


def format_table(report: dict[str, Any]) -> str:
    """Return the task / metric / base / adapter / delta table `peftkit eval --lm-eval` prints."""
    rows = report["scores"]
    sides = ["base"] + (["adapter"] if any("adapter" in r for r in rows) else [])
    task_w = max([len("task")] + [len(r["task"]) for r in rows]) + 2
    metric_w = max([len("metric")] + [len(r["metric"]) for r in rows]) + 2
    head = f"{'task':<{task_w}}{'metric':<{metric_w}}" + "".join(f"{s:>10}" for s in sides)
    head += f"{'delta':>10}" if len(sides) == 2 else ""
    lines = [f"{report.get('adapter') or report['base_model']}: lm-evaluation-harness {report['lm_eval_version']}"
             + (f", first {report['limit']} documents per task" if report.get("limit") else ""),
             "", head, "-" * len(head)]
    for r in rows:
        line = f"{r['task']:<{task_w}}{r['metric']:<{metric_w}}" + "".join(f"{_fmt(r.get(s)):>10}" for s in sides)
        if len(sides) == 2:
            line += f"{'n/a' if r['difference'] is None else format(r['difference'], '+.4f'):>10}"
        lines.append(line)
    lines += ["", f"({report['seconds']:.0f} s)"]
    return "\n".join(lines)


def run_harness(ref_or_dir: str | None, settings: HarnessSettings, *, base: str | None = None,
                base_only: bool = False, registry: str | None = None, dtype: str = "auto",
                out: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """Return the side-by-side lm_eval report for an adapter (registry reference or folder) and its JSON file."""
    from peftkit import atomic
    from peftkit.evaluate import _slug
    from peftkit.generate import resolve_adapter
    from peftkit.methods import read_adapter_meta
    from peftkit.models import default_device, resolve_dtype, resolve_model

    lm_eval = import_lm_eval()
    started = time.perf_counter()
    manager = load_task_manager(settings.tasks, settings.include)  # before any model loads: a typo fails fast
    adapter_dir = resolve_adapter(ref_or_dir, registry) if ref_or_dir else None
    base_name = base or (read_adapter_meta(adapter_dir) if adapter_dir else {}).get("base_model") or DEFAULT_BASE
    sides = model_args(adapter_dir, resolve_model(base_name))
    if base_only:
        sides.pop("adapter", None)
    torch_dtype, device = resolve_dtype(dtype), default_device()
    results = {side: evaluate_side(args, manager, settings, dtype=torch_dtype, device=device)
               for side, args in sides.items()}
    report = {"adapter": ref_or_dir, "base_model": base_name, "tasks": settings.tasks, "include": settings.include,
              "limit": settings.limit, "batch_size": settings.batch_size,
              "dtype": str(torch_dtype).removeprefix("torch."), "lm_eval_version": lm_eval.__version__,
              "scores": score_rows(results), "lm_eval": results, "seconds": time.perf_counter() - started}
    target = Path(out) if out else Path(f"lm-eval-{_slug(ref_or_dir or base_name)}.json")
    atomic.write_json(target, report)
    return report, target


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
