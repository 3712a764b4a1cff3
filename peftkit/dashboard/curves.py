"""A run's logged scalars (loss, eval loss, learning rate, ...) as {tag: [[step, value], ...]}, read while it trains.

TensorBoard event files are the live source: transformers' TensorBoard callback writes and flushes one
event per logged step, and every run writes them unless train.report_to leaves tensorboard out. Each
file is read by TensorBoard's own loader, which resumes where it stopped and waits out a record still
being written, so polling a running run reads only what is new. Without event files the newest
checkpoint's trainer_state.json (the Trainer's log history up to that checkpoint) stands in.
Tags follow transformers' TensorBoard names: `train/loss`, `eval/loss`, `train/learning_rate`.
"""
from __future__ import annotations

import json
import math
import threading
from pathlib import Path

MAX_POINTS = 2000
"""Points per series sent to the page; longer series keep every n-th point and the last."""


class _EventFile:
    """One event file's scalars so far and the loader that continues reading it."""

    def __init__(self, path: Path):
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

        self.loader = LegacyEventFileLoader(str(path))
        self.size = 0
        self.scalars: dict[str, dict[int, float]] = {}

    def read_new(self) -> None:
        """Add the events written since the last read."""
        for event in self.loader.Load():
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":  # text summaries (args, model config) are not curves
                    self.scalars.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)


_files: dict[Path, _EventFile] = {}
_lock = threading.Lock()


def read_curves(run_dir: Path) -> tuple[dict[str, list[list[float]]], str]:
    """Return ({tag: [[step, value], ...]}, where they came from: "tensorboard", "checkpoint" or "none")."""
    events = sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*")) if (run_dir / "tensorboard").is_dir() else []
    if events:
        merged: dict[str, dict[int, float]] = {}
        for path in events:  # oldest first (names start with the time): a resumed run's rewrite of a step wins
            for tag, points in _event_scalars(path).items():
                merged.setdefault(tag, {}).update(points)
        return {tag: _points(points) for tag, points in sorted(merged.items())}, "tensorboard"
    state = newest_trainer_state(run_dir / "checkpoints")
    if state is not None:
        return history_curves(state.get("log_history") or []), "checkpoint"
    return {}, "none"


def history_curves(history: list[dict]) -> dict[str, list[list[float]]]:
    """Return the Trainer's log history as curves under TensorBoard's tag names (eval_loss -> eval/loss)."""
    merged: dict[str, dict[int, float]] = {}
    for entry in history:
        step = entry.get("step")
        for key, value in entry.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool) or step is None:
                continue
            tag = "eval/" + key[5:] if key.startswith("eval_") else "train/" + key
            merged.setdefault(tag, {})[int(step)] = float(value)
    return {tag: _points(points) for tag, points in sorted(merged.items())}


def newest_trainer_state(checkpoint_dir: Path) -> dict | None:
    """Return the trainer_state.json of the highest-numbered checkpoint that has one, or None."""
    if not checkpoint_dir.is_dir():
        return None
    found = []
    for folder in checkpoint_dir.glob("checkpoint-*"):
        step = folder.name.partition("-")[2]
        if step.isdigit() and (folder / "trainer_state.json").is_file():
            found.append((int(step), folder / "trainer_state.json"))
    for _, path in sorted(found, reverse=True):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # a checkpoint being rotated away as we read it
            continue
    return None


def _event_scalars(path: Path) -> dict[str, dict[int, float]]:
    with _lock:
        size = path.stat().st_size
        known = _files.get(path)
        if known is None or size < known.size:  # new, or replaced by a shorter file
            known = _files[path] = _EventFile(path)
        if size != known.size:
            known.read_new()
            known.size = size
        return {tag: dict(points) for tag, points in known.scalars.items()}


def _points(points: dict[int, float]) -> list[list[float]]:
    steps = sorted(points)
    if len(steps) > MAX_POINTS:
        stride = math.ceil(len(steps) / MAX_POINTS)
        steps = steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])
    return [[step, points[step] if math.isfinite(points[step]) else None] for step in steps]
