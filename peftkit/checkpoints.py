"""Crash-safe run state: atomic checkpoints, atomic folder swaps, graceful stops, resume checks.

A checkpoint is written into a hidden staging folder, fsynced, stamped with a completeness
marker last, then renamed into place; resume only ever considers stamped folders. So a kill,
a crash or a full disk at any moment leaves the previous checkpoint and adapter untouched.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.registry.store import fsync_dir

log = logging.getLogger(__name__)

MARKER = "peftkit-complete.json"
RUN_STATE = "run.json"
# Config fields that may change between an interrupted run and its resume without changing what is trained.
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.save_steps", "train.save_total_limit",
                     "train.logging_steps", "train.eval_steps", "train.output_dir", "registry.register",
                     "registry.path", "registry.tags", "registry.domain", "data.cache_dir")


class DiskFullError(PeftkitError):
    """A save ran out of disk space; what was saved before is intact."""


class TrainingInterrupted(PeftkitError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    exit_code = 130  # the shell's code for "stopped by Ctrl-C"


class ResumeMismatch(PeftkitError):
    """A resume would continue with different data, config or base model."""


# ---------------------------------------------------------------- atomic folders

def fsync_tree(folder: Path) -> None:
    """Flush every file in folder, and the folder entries themselves, to disk."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        fsync_dir(d)


def swap_into_place(staged: Path, target: Path) -> None:
    """Move the complete folder staged to target, replacing target without a moment where neither exists."""
    if target.exists() and _rename_exchange(staged, target):
        shutil.rmtree(staged)  # staged now holds the old folder
    else:
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
        os.rename(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def recover_swap(target: Path) -> None:
    """Restore target from its .old copy if a crash fell between the two renames of a non-atomic swap."""
    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        os.rename(old, target)
        log.warning("restored %s after an interrupted save", target)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False


def write_staged(target: Path, write, *, what: str) -> Path:
    """Return target after calling write(staging_dir) and swapping the result into place atomically.

    A failure while writing (a full disk, a crash of write) removes the staging folder and leaves
    target as it was.
    """
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging)
        (staging / MARKER).write_text(json.dumps({"saved_at": time.time()}), encoding="utf-8")
        fsync_tree(staging)
        swap_into_place(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on the disk while saving the {what} to {target}; the previous "
                                f"{what} is intact. Free some space (or set train.output_dir elsewhere) and resume "
                                f"with --resume") from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def is_complete(folder: Path) -> bool:
    """Return True when folder was fully written (its completeness marker exists)."""
    return (folder / MARKER).is_file()


def latest_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """Return the newest complete checkpoint-N folder, or None."""
    if not checkpoint_dir.is_dir():
        return None
    found = [p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and is_complete(p)]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


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
    path = out / RUN_STATE
    tmp = path.with_name(RUN_STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


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
