"""Crash-safe run state: atomic checkpoints, atomic folder swaps, graceful stops, resume checks.

A checkpoint is written into a hidden staging folder, fsynced, stamped with a completeness
marker last, then renamed into place; resume only ever considers stamped folders. So a kill,
a crash or a full disk at any moment leaves the previous checkpoint and adapter untouched.
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from pathlib import Path

from peftkit import atomic
from peftkit.errors import PeftkitError

log = logging.getLogger(__name__)

MARKER = "peftkit-complete.json"
RUN_STATE = "run.json"
# Config fields that may change between an interrupted run and its resume without changing what is trained.
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.save_steps", "train.save_total_limit",
                     "train.logging_steps", "train.eval_steps", "train.output_dir", "registry.register",
                     "registry.path", "registry.tags", "registry.domain", "data.cache_dir", "eval.generate",
                     "eval.max_new_tokens", "eval.examples", "train.report_to", "model.offline", "data.offline")


class DiskFullError(PeftkitError):
    """A save ran out of disk space; what was saved before is intact."""


class TrainingInterrupted(PeftkitError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    exit_code = 130  # the shell's code for "stopped by Ctrl-C"


class ResumeMismatch(PeftkitError):
    """A resume would continue with different data, config or base model."""


# ---------------------------------------------------------------- atomic folders

def write_staged(target: Path, write, *, what: str) -> Path:
    """Return target after calling write(staging_dir) and swapping the result into place atomically.

    The staging folder is stamped with the completeness marker last. A failure while writing (a full
    disk, a crash of write) removes the staging folder and leaves target as it was.
    """
    def stamp(staging: Path) -> None:
        (staging / MARKER).write_text(json.dumps({"saved_at": time.time()}), encoding="utf-8")

    try:
        return atomic.write_folder(target, write, finish=stamp)
    except Exception as exc:
        if atomic.is_disk_full(exc):
            raise DiskFullError(f"no space left on the disk while saving the {what} to {target}; the previous "
                                f"{what} is intact. Free some space (or set train.output_dir elsewhere) and resume "
                                f"with --resume") from None
        raise


def is_complete(folder: Path) -> bool:
    """Return True when folder was fully written (its completeness marker exists)."""
    return (folder / MARKER).is_file()


def checkpoint_step(folder: Path) -> int | None:
    """Return N for a folder named checkpoint-N, else None."""
    prefix, _, step = folder.name.partition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() else None


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Return the complete checkpoint-N folders, oldest step first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.glob("checkpoint-*") if checkpoint_step(p) is not None and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """Return the newest complete checkpoint-N folder, or None."""
    found = complete_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def clean_staging(folder: Path) -> None:
    """Remove staging and half-deleted folders left by a killed save or rotation."""
    if folder.is_dir():
        for pattern in (".*.tmp-*", ".staging-*", ".deleting-*"):
            for p in folder.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- run state and resume checks

def read_run_state(out: Path) -> dict | None:
    """Return the run's state file, or None for a new output dir."""
    path = out / RUN_STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_run_state(out: Path, **state) -> None:
    """Write run.json atomically (status, fingerprints, flattened config)."""
    atomic.write_json(out / RUN_STATE, state)


def flatten(d: dict, prefix: str = "") -> dict:
    """Return a nested dict as {dotted.key: value}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v) and prefix == "":
            out.update(flatten(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_differences(previous: dict, current: dict) -> list[str]:
    """Return the names of what differs between the saved run state and this run, ignoring safe changes."""
    diffs = []
    for key in ("base_fingerprint", "data_fingerprint"):
        if previous.get(key) != current.get(key):
            diffs.append({"base_fingerprint": "base model (model.name weights)", "data_fingerprint": "data (data files or data settings)"}[key])
    old, new = previous.get("config", {}), current.get("config", {})
    for key in sorted(set(old) | set(new)):
        if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key):
            diffs.append(f"{key} ({old.get(key)!r} -> {new.get(key)!r})")
    return diffs


# ---------------------------------------------------------------- graceful stop

class GracefulStop:
    """Turn the first SIGINT/SIGTERM into 'finish this step, save, stop'; a second SIGINT stops at once."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: finishing this step and saving a checkpoint (press Ctrl-C again to stop now)", self.requested)
