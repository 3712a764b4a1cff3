"""Several processes adding at once all succeed; a process killed mid-add leaves nothing half-registered."""
from __future__ import annotations

import multiprocessing as mp
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftkit.registry import Registry

WORKERS = 8
PAUSED_ADD = Path(__file__).with_name("paused_add.py")


def _add_when_all_ready(registry: str, folder: str, barrier, results) -> None:
    # Every worker opens the (not yet created) registry, then all add at the same moment.
    barrier.wait(timeout=60)
    try:
        results.put(Registry(registry).add(folder, "shared").ref)
    except Exception as exc:  # reported to the test instead of dying silently
        results.put(f"ERROR {type(exc).__name__}: {exc}")


def test_concurrent_adds_from_several_processes_all_get_their_own_version(tmp_path, make_adapter):
    folders = [str(make_adapter()) for _ in range(WORKERS)]
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_add_when_all_ready, args=(str(tmp_path / "reg"), f, barrier, results)) for f in folders]
    for p in procs:
        p.start()
    refs = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert refs == sorted(f"shared@{v}" for v in range(1, WORKERS + 1))
    reg = Registry(tmp_path / "reg")
    assert [e.version for e in reg.list()] == list(range(1, WORKERS + 1))
    report = reg.verify()
    assert report.ok and report.entries == WORKERS and report.files == 3 * WORKERS
    # Every worker stored its own weights: eight distinct safetensors blobs.
    assert len({e.content_sha256 for e in reg.list()}) == WORKERS


def _start_paused_add(registry, folder, point, marker) -> subprocess.Popen:
    # paused_add.py patches the pause into its own process; the registry has no test hook.
    proc = subprocess.Popen([sys.executable, str(PAUSED_ADD), str(registry), str(folder), point, str(marker)])
    deadline = time.time() + 60
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the add never reached {point} (exit {proc.returncode})")
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("point, leftover_temps, leftover_blobs", [
    ("staged", 3, 0),          # files written to tmp/, nothing renamed yet
    ("blobs-stored", 0, 2),    # blobs renamed inside the transaction, no row yet (adapter_config.json is shared with bot@1)
    ("row-inserted", 0, 2),    # row inserted but never committed
])
def test_a_kill_during_add_leaves_no_partial_entry_and_gc_cleans_up(tmp_path, make_adapter, point, leftover_temps, leftover_blobs):
    registry = tmp_path / "reg"
    reg = Registry(registry)
    reg.add(make_adapter(), "bot")
    blobs_before = {sha for sha, _ in reg.store.iter_blobs()}

    proc = _start_paused_add(registry, make_adapter(), point, tmp_path / "paused")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL

    reg = Registry(registry)
    assert [e.ref for e in reg.list()] == ["bot@1"]  # no partial entry is visible
    report = reg.verify()
    assert report.ok and report.orphans == leftover_blobs
    gc = reg.gc()
    assert (gc.temps_removed, gc.blobs_removed) == (leftover_temps, leftover_blobs)
    assert {sha for sha, _ in reg.store.iter_blobs()} == blobs_before and list(reg.store.tmp.iterdir()) == []
    assert reg.add(make_adapter(), "bot").ref == "bot@2"  # the killed add's version number was never committed
    assert reg.verify().ok


def test_gc_leaves_the_temp_files_of_a_live_add_alone(tmp_path, make_adapter):
    registry = tmp_path / "reg"
    Registry(registry)
    proc = _start_paused_add(registry, make_adapter(), "staged", tmp_path / "paused")
    try:
        assert Registry(registry).gc().temps_removed == 0
        assert len(list((registry / "tmp").iterdir())) == 3
    finally:
        proc.kill()
        proc.wait()
    assert Registry(registry).gc().temps_removed == 3
