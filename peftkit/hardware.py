"""Which dtype trains fastest on this machine, decided by measuring it once and remembering the answer.

CPU flags do not tell: an AVX2-only EPYC emulates bf16 (about 50x slower than fp32), an EPYC with
AVX512-BF16 gains a little, a Sapphire Rapids with AMX gains several times. So `model.dtype: auto`
runs a short probe (matmul throughput in fp32 and bf16, and one small transformer-like block's
forward and backward in each) and keeps the result under $PEFTKIT_HOME/probe, keyed by the CPU,
its core count, the torch version and the thread count; training records the probe in metrics.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

PROBE_VERSION = 1
# bf16 must beat fp32 clearly on the block (forward + backward), not only on a bare matmul:
# the casts and the fp32 optimizer state around it cost time a matmul probe does not see.
BF16_WINS_BELOW = 0.8


def cpu_name() -> str:
    """Return the CPU's model name as /proc/cpuinfo gives it (or what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """Return the cache key of this machine's probe: CPU, cores, torch version and thread count."""
    text = f"{cpu_name()}|{len(os.sched_getaffinity(0))}|{torch.__version__}|{torch.get_num_threads()}|{PROBE_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _timed(fn: Callable[[], Any], min_seconds: float) -> float:
    """Return the mean seconds of fn over as many calls as fit in min_seconds (after one warm-up call)."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def matmul_gflops(dtype: torch.dtype, size: int = 1024, min_seconds: float = 0.25) -> float:
    """Return the measured matmul throughput of this CPU in GFLOP/s for one dtype."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    return 2 * size**3 / _timed(lambda: torch.matmul(a, b), min_seconds) / 1e9


def block_seconds(dtype: torch.dtype, hidden: int = 576, tokens: int = 512, min_seconds: float = 0.25) -> float:
    """Return the seconds of one small Llama-like MLP block's forward and backward (frozen weights) in dtype."""
    torch.manual_seed(0)
    up = torch.nn.Linear(hidden, 3 * hidden, bias=False).to(dtype).requires_grad_(False)
    down = torch.nn.Linear(3 * hidden, hidden, bias=False).to(dtype).requires_grad_(False)
    norm = torch.nn.RMSNorm(hidden).to(dtype)
    x = torch.randn(tokens, hidden).to(dtype).requires_grad_(True)

    def step():
        out = down(torch.nn.functional.silu(up(norm(x))))
        out.float().pow(2).mean().backward()

    return _timed(step, min_seconds)


def run_probe() -> dict[str, Any]:
    """Return a fresh measurement: fp32 and bf16 matmul GFLOP/s and block times, and the dtype chosen."""
    started = time.perf_counter()
    result = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        result[f"{name}_matmul_gflops"] = round(matmul_gflops(dtype), 2)
        result[f"{name}_block_ms"] = round(1000 * block_seconds(dtype), 3)
    result["bf16_over_fp32_time"] = round(result["bf16_block_ms"] / result["fp32_block_ms"], 3)
    result["choice"] = "bf16" if result["bf16_over_fp32_time"] < BF16_WINS_BELOW else "fp32"
    result["probe_seconds"] = round(time.perf_counter() - started, 2)
    return result


def cpu_probe(home: Path | None = None, *, measure: Callable[[], dict] | None = None) -> dict[str, Any]:
    """Return this machine's dtype probe, measured once and then read from $PEFTKIT_HOME/probe."""
    from peftkit import atomic
    from peftkit.config import peftkit_home

    path = (home or peftkit_home()) / "probe" / f"cpu-{machine_key()}.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("choice") in ("bf16", "fp32"):
            return {**cached, "cached": True}
    except (OSError, ValueError):
        pass
    result = (measure or run_probe)()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, result)
    except OSError:  # a read-only home still trains; it only measures again next time
        pass
    return {**result, "cached": False}


def decode_threads(hidden: int, intermediate: int, dtype: torch.dtype, rows: int = 8,
                   min_seconds: float = 0.05) -> dict[str, Any]:
    """Return {"threads": the faster intra-op thread count for decode-sized matmuls, "ms": {count: ms}}.

    A decode step multiplies a few rows by each weight. On a CPU whose cores other jobs share, OpenMP
    threads can spin against each other and make two threads ten times slower than one (measured on a
    shared 2-core machine); on an idle one more threads win. So the server asks the machine at start.
    """
    weight = torch.randn(hidden, intermediate).to(dtype)
    x = torch.randn(rows, hidden).to(dtype)
    before = torch.get_num_threads()
    timings = {}
    try:
        for count in sorted({1, len(os.sched_getaffinity(0))}):
            torch.set_num_threads(count)
            timings[count] = round(1000 * _timed(lambda: x @ weight, min_seconds), 4)
    finally:
        torch.set_num_threads(before)
    return {"threads": min(timings, key=timings.get), "ms": timings}


def dtype_source(setting: str, dtype: torch.dtype) -> str:
    """Return a line saying why the model runs in dtype: the setting, or the measured probe behind `auto`."""
    if setting != "auto":
        return f"--dtype {setting}"
    if torch.cuda.is_available():
        return "auto on a GPU: bf16 where supported, else fp16"
    probe = cpu_probe()
    return (f"auto, measured on this CPU: a bf16 block took {probe['bf16_block_ms']} ms against fp32's "
            f"{probe['fp32_block_ms']} ms (choice {probe['choice']})")
