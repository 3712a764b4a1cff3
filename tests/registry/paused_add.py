"""Run one Registry.add that stops at a named step, so a test can SIGKILL it there.

    python paused_add.py REGISTRY FOLDER POINT MARKER

POINT is where the add waits (after touching MARKER): staged (every file written to tmp/, no
transaction yet), blobs-stored (blobs renamed into place inside the transaction, no row yet) or
row-inserted (the row written, never committed). The pause is patched in here, so the registry
itself carries no test hook.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from peftkit.registry import Registry
from peftkit.registry.catalog import Catalog


def pause_around(owner: type, method: str, marker: Path, before: bool) -> None:
    """Patch owner.method to touch marker and sleep, before the original runs or after it returns."""
    original = getattr(owner, method)

    def paused(*args, **kwargs):
        if before:
            _stop(marker)
        result = original(*args, **kwargs)
        if not before:
            _stop(marker)
        return result

    setattr(owner, method, paused)


def _stop(marker: Path) -> None:
    marker.touch()
    time.sleep(3600)  # the test kills us here


POINTS = {  # point -> (class, method, pause before the call rather than after it)
    "staged": (Registry, "_register", True),       # add() has staged and checked every file, then registers
    "blobs-stored": (Catalog, "insert", True),     # _register() renamed the blobs, then inserts the row
    "row-inserted": (Catalog, "insert", False),    # the row is in, the transaction not committed
}


if __name__ == "__main__":
    registry, folder, point, marker = sys.argv[1:5]
    owner, method, before = POINTS[point]
    pause_around(owner, method, Path(marker), before)
    Registry(registry).add(folder, "bot")
