"""The training runs under one folder, as the page shows them: status, curves, config, metrics, data and evaluation.

A run is a folder holding run.json (what `peftkit train` writes first, with status running, then
interrupted or finished), found up to MAX_DEPTH folders below the runs folder (`runs/<name>`, or
deeper as `peftkit bench train` nests them). Runs are looked up by their id, the path below the
runs folder, only among the runs found: a client never makes the server read a path it sent.
No torch here.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from peftkit.checkpoints import RUN_STATE
from peftkit.dashboard.curves import newest_trainer_state, read_curves

MAX_DEPTH = 3
MAX_RUNS = 500
# Folders a run writes that hold no runs of their own: never walked into.
RUN_PARTS = {"adapter", "checkpoints", "tensorboard", "wandb", "mlflow", "trackio", "peftkit-data-cache"}
CONFIG_TEXT_LIMIT = 200_000
STALE_AFTER_S = 600
"""A run still marked running with no file changed for this long is shown as possibly stopped."""


class UnknownRunError(LookupError):
    """No run with that id under the runs folder."""


def find_runs(root: Path) -> dict[str, Path]:
    """Return {run id: folder} for every run under root (ids are '/'-separated paths below root)."""
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    pending = [(root, 0)]
    while pending and len(found) < MAX_RUNS:
        folder, depth = pending.pop()
        try:
            children = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        if any(c.name == RUN_STATE and c.is_file(follow_symlinks=False) for c in children) and folder != root:
            found[folder.relative_to(root).as_posix()] = folder
        if depth < MAX_DEPTH:
            pending += [(Path(c.path), depth + 1) for c in children
                        if c.is_dir(follow_symlinks=False) and not c.name.startswith(".") and c.name not in RUN_PARTS]
    return found


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Return a summary of every run, the most recently updated first."""
    out = [run_summary(run_id, folder) for run_id, folder in find_runs(root).items()]
    return sorted(out, key=lambda r: (r["updated_age_s"] is None, r["updated_age_s"] or 0.0))


def run_summary(run_id: str, folder: Path) -> dict[str, Any]:
    """Return what the runs list shows: name, status, step, latest losses, method and model, last update."""
    state = _read_json(folder / RUN_STATE) or {}
    metrics = _read_json(folder / "metrics.json") or {}
    config = state.get("config") or {}
    status = state.get("status") or "unknown"
    updated = _updated_at(folder)
    age = None if updated is None else max(0.0, time.time() - updated)
    step = state.get("step")
    train_loss, eval_loss = metrics.get("train_loss"), metrics.get("eval_loss")
    if status == "running":  # run.json and metrics.json say nothing new until the run ends: the logged curves do
        curves = read_curves(folder)[0]
        step = max([step or 0, *(p[0] for p in curves.get("train/loss", []))])
        train_loss, eval_loss = _last(curves.get("train/loss")), _last(curves.get("eval/loss"))
    return {
        "id": run_id, "name": config.get("name") or folder.name, "status": status, "step": step,
        "max_steps": _max_steps(config, folder), "method": config.get("method.name"), "model": config.get("model.name"),
        "train_loss": train_loss, "eval_loss": eval_loss,
        "updated_at": None if updated is None else _iso(updated), "updated_age_s": age,
        "stale": status == "running" and age is not None and age > STALE_AFTER_S,
    }


def read_run(root: Path, run_id: str) -> dict[str, Any]:
    """Return one run whole: summary, curves, resolved config, metrics, data statistics, evaluation, fingerprints."""
    folder = find_runs(root).get(run_id)
    if folder is None:
        raise UnknownRunError(f"no run {run_id!r} under {root}; the runs page lists those there are")
    summary = run_summary(run_id, folder)
    state = _read_json(folder / RUN_STATE) or {}
    metrics = dict(_read_json(folder / "metrics.json") or {})
    curves, source = read_curves(folder)
    config_text = folder / "config.yaml"
    return {
        **summary,
        "path": str(folder),
        "curves": curves, "curves_source": source,
        "config": state.get("config") or {},
        "config_yaml": config_text.read_text(encoding="utf-8", errors="replace")[:CONFIG_TEXT_LIMIT] if config_text.is_file() else None,
        "base_fingerprint": state.get("base_fingerprint"), "data_fingerprint": state.get("data_fingerprint"),
        "data": metrics.pop("data", None),
        "evaluation": metrics.pop("evaluation", None),
        "metrics": metrics,
        "has_adapter": (folder / "adapter" / "adapter_config.json").is_file() or (folder / "adapter" / "peftkit.json").is_file(),
    }


def clean(value: Any) -> Any:
    """Return value with NaN and infinities as None, so it is valid JSON for the page (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def _max_steps(config: dict, folder: Path) -> int | None:
    steps = config.get("train.max_steps")
    if isinstance(steps, int) and steps > 0:
        return steps
    trainer_state = newest_trainer_state(folder / "checkpoints")
    return (trainer_state or {}).get("max_steps")


def _updated_at(folder: Path) -> float | None:
    """Return the newest modification time of what a run writes as it goes."""
    candidates = [folder / RUN_STATE, folder / "metrics.json", folder / "checkpoints"]
    tensorboard = folder / "tensorboard"
    if tensorboard.is_dir():
        candidates += list(tensorboard.rglob("events.out.tfevents.*"))
    times = []
    for path in candidates:
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            continue
    return max(times, default=None)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, or caught mid-write by a writer that is not atomic
        return None
    return value if isinstance(value, dict) else None


def _last(points: list | None):
    return points[-1][1] if points else None


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
