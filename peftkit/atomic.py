"""Crash-safe writes: a file or folder appears whole or not at all, whatever kills the process.

Every write goes to a temporary sibling first, is flushed to disk, then renamed over its target;
rename within one folder is atomic on POSIX file systems, and flushing the folder afterwards makes
the rename itself survive a power cut. No torch here: the registry and the config use it too.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)


def is_disk_full(exc: BaseException | None) -> bool:
    """Return True when exc, or an exception it was raised from, means the disk (or quota) is full."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc):  # libraries that wrap the OSError in their own type
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def fsync_file(path: Path) -> None:
    """Flush one file's bytes to disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk so that a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file in folder, and the folder entries themselves, to disk."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_file(path)
    for d in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        fsync_dir(d)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside path; on success it is flushed and renamed over path, on failure removed.

    The temporary name keeps path's suffix, so writers that choose a format by suffix (matplotlib) still work.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes to path atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text to path atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    """Write data as indented JSON to path atomically (values JSON cannot hold are written as strings)."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


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


def write_folder(target: Path, write: Callable[[Path], None], *, finish: Callable[[Path], None] | None = None) -> Path:
    """Return target after write(staging folder) filled a hidden sibling that is then flushed and swapped in.

    finish(staging) runs last before the flush (a completeness marker, say). A failure at any point
    removes the staging folder and leaves target as it was; the exception goes on to the caller.
    """
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging)
        if finish is not None:
            finish(staging)
        fsync_tree(staging)
        swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
