"""model.dtype=auto on a CPU: a measured probe, cached per machine, recorded with the run."""
from __future__ import annotations

import json

import pytest
import torch

from peftkit import hardware


def fake_timings(monkeypatch, *, fp32_ms: float, bf16_ms: float):
    monkeypatch.setattr(hardware, "matmul_gflops", lambda dtype: 100.0 if dtype is torch.float32 else 200.0)
    monkeypatch.setattr(hardware, "block_seconds", lambda dtype: (fp32_ms if dtype is torch.float32 else bf16_ms) / 1000)


@pytest.mark.parametrize("fp32_ms, bf16_ms, choice", [
    (15.0, 4.3, "bf16"),    # AMX: bf16 about 3.5x faster on the block
    (15.0, 750.0, "fp32"),  # AVX2 only: bf16 emulated, about 50x slower
    (15.0, 13.0, "fp32"),   # a small gain does not pay for the casts around it
])
def test_probe_picks_bf16_only_where_it_trains_clearly_faster(monkeypatch, fp32_ms, bf16_ms, choice):
    fake_timings(monkeypatch, fp32_ms=fp32_ms, bf16_ms=bf16_ms)
    result = hardware.run_probe()
    assert result["choice"] == choice
    assert result["bf16_over_fp32_time"] == pytest.approx(bf16_ms / fp32_ms, abs=1e-3)
    assert result["cpu"] == hardware.cpu_name() and result["threads"] == torch.get_num_threads()


def test_real_probe_measures_both_dtypes():
    result = hardware.run_probe()
    for key in ("fp32_matmul_gflops", "bf16_matmul_gflops", "fp32_block_ms", "bf16_block_ms"):
        assert result[key] > 0, key
    assert result["choice"] in ("bf16", "fp32") and result["probe_seconds"] < 30


def test_probe_is_measured_once_per_machine(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return {"choice": "fp32", "fp32_block_ms": 1.0}

    first = hardware.cpu_probe(tmp_path, measure=measure)
    second = hardware.cpu_probe(tmp_path, measure=measure)
    assert len(calls) == 1 and first["cached"] is False and second["cached"] is True
    assert second["choice"] == "fp32"
    (cache_file,) = (tmp_path / "probe").iterdir()
    assert json.loads(cache_file.read_text())["choice"] == "fp32"
    cache_file.write_text("{not json")  # a damaged cache is measured again, never trusted
    assert hardware.cpu_probe(tmp_path, measure=measure)["cached"] is False and len(calls) == 2


def test_runs_record_the_probe_behind_auto(monkeypatch, peftkit_home):
    from peftkit.lineage import dtype_probe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "run_probe", lambda: {"choice": "bf16", "bf16_over_fp32_time": 0.3})
    assert dtype_probe("auto")["choice"] == "bf16" and dtype_probe("auto")["cached"] is True
    assert dtype_probe("fp32") is None


def test_decode_threads_times_one_and_every_core_and_restores_the_setting(monkeypatch):
    import os

    before = torch.get_num_threads()
    result = hardware.decode_threads(64, 256, torch.float32, min_seconds=0.01)
    assert set(result["ms"]) == {1, len(os.sched_getaffinity(0))} and all(ms > 0 for ms in result["ms"].values())
    assert result["threads"] == min(result["ms"], key=result["ms"].get)
    assert torch.get_num_threads() == before
    # The faster count wins, whichever it is.
    monkeypatch.setattr(hardware, "_timed", lambda fn, min_seconds: 0.001 * torch.get_num_threads())
    assert hardware.decode_threads(64, 256, torch.float32)["threads"] == 1


def test_dtype_source_names_the_setting_or_the_measurement(monkeypatch):
    assert hardware.dtype_source("fp32", torch.float32) == "--dtype fp32"
    monkeypatch.setattr(hardware, "cpu_probe", lambda: {"bf16_block_ms": 4.3, "fp32_block_ms": 15.0, "choice": "bf16"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.dtype_source("auto", torch.bfloat16) == (
        "auto, measured on this CPU: a bf16 block took 4.3 ms against fp32's 15.0 ms (choice bf16)")
