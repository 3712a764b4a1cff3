"""Errors the registry raises; each message names what is wrong and how to fix it."""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from peftkit.errors import PeftkitError


class RegistryError(PeftkitError):
    """Something about the registry or a request to it is wrong."""


class InvalidNameError(RegistryError, ValueError):
    """A name, tag, domain, reference or archive path uses characters the registry refuses."""


class UnknownRefError(RegistryError, KeyError):
    """A reference names no registered adapter; the message lists close names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class PickleRefusedError(RegistryError):
    """A pickle-based weights file was offered; pickle is never loaded."""


class AdapterValidationError(RegistryError, ValueError):
    """An adapter's files or tensor shapes do not fit its config or its base model."""


class BaseMismatchError(RegistryError):
    """The adapter was trained on another base than earlier versions of its name."""


class ArchiveError(RegistryError):
    """An export archive is unsafe, incomplete or corrupt."""


class DiskFullError(RegistryError):
    """The disk (or the quota) ran out while the registry wrote; what was being written was left out whole."""


SQLITE_FULL = "database or disk is full"


def is_full(exc: BaseException) -> bool:
    """Return True when exc means no space was left: ENOSPC/EDQUOT, or SQLite's own full-disk error."""
    from peftkit.atomic import is_disk_full

    return is_disk_full(exc) or SQLITE_FULL in str(exc)


@contextmanager
def refuse_when_full(doing: str, not_written: str, where: Path) -> Iterator[None]:
    """Turn running out of disk space inside the block into one DiskFullError naming what was not written and the fix."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        if not is_full(exc):
            raise
        raise DiskFullError(f"no space left on the disk while {doing}: {not_written}. Free space on the file system "
                            f"holding {where} (see `df -h {where}`; `peftkit registry gc` frees files no version uses), "
                            "then run the same command again") from exc
