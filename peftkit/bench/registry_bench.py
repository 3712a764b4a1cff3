"""Registry look-up speed with many adapters: fill a registry through Registry.add, then time list and show.

    python -m peftkit.bench.registry_bench --count 10000 --registry /tmp/peftkit-bench-registry

Each adapter is a small but valid LoRA (rank 2 on q_proj and v_proj of a 2-layer Llama) with its own
weights, so every add stores new blobs, fsyncs them and commits its own transaction, as a real add does.
A registry that already holds --count entries is reused. Prints a Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peftkit.registry import Registry

DOMAINS = ("retail", "legal", "medical", "finance", "support", "travel", "games", "code", "edu", "hr")
TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 49152, "model_type": "llama"}
SHAPES = {"q_proj": (64, 64), "v_proj": (64, 32)}  # (in, out)


def main(argv: list[str] | None = None) -> int:
    """Fill the registry if needed, time list/show, print the table; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="adapters in the registry")
    parser.add_argument("--names", type=int, default=1_000, help="distinct names (count/names versions each)")
    parser.add_argument("--registry", default=str(Path(tempfile.gettempdir()) / "peftkit-bench-registry"))
    parser.add_argument("--repeat", type=int, default=20, help="timed repeats of each API call")
    parser.add_argument("--cli-repeat", type=int, default=5, help="timed repeats of each CLI command")
    args = parser.parse_args(argv)
    reg = Registry(args.registry)
    fill_seconds = fill(reg, args.count, args.names)
    probe = f"adapter-{min(421, args.names - 1):04d}"  # a name in the middle of the catalog
    version = min(5, args.count // args.names)
    rows = time_api(reg, probe, version, args.repeat) + time_cli(args.registry, probe, version, args.cli_repeat)
    print(report(args, reg, fill_seconds, rows))
    return 0


def fill(reg: Registry, count: int, names: int) -> float | None:
    """Return the seconds spent adding adapters until the registry holds `count` (None when it already did)."""
    have = len(reg.list())
    if have >= count:
        return None
    src = Path(tempfile.mkdtemp(prefix="peftkit-bench-src-"))
    start = time.perf_counter()
    for i in range(have, count):
        write_tiny_lora(src, seed=i)
        name = f"adapter-{i % names:04d}"
        tags = ["stable"] if (i // names) % 5 == 0 else []
        reg.add(src, name, tags=tags, domain=DOMAINS[i % len(DOMAINS)])
        if (i + 1) % 1000 == 0:
            print(f"added {i + 1}/{count} ({(i + 1 - have) / (time.perf_counter() - start):.0f}/s)", file=sys.stderr)
    return time.perf_counter() - start


def write_tiny_lora(folder: Path, seed: int) -> None:
    """Write adapter_config.json, adapter_model.safetensors and peftkit.json with weights unique to seed."""
    tensors = {}
    for layer in range(2):
        for module, (n_in, n_out) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (2, n_in)
            tensors[f"{prefix}.lora_B.weight"] = (n_out, 2)
    _write_safetensors(folder / "adapter_model.safetensors", tensors, seed)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            "target_modules": list(SHAPES), "task_type": "CAUSAL_LM"}))
    (folder / "peftkit.json").write_text(json.dumps({
        "peftkit_version": "bench", "method": "lora", "base_model": "tiny-llama", "base_fingerprint": "sha256:" + "0" * 64,
        "base_config": TINY_LLAMA, "data_fingerprint": f"sha256:{seed:064x}", "config": {"method": {"rank": 2}},
        "metrics": {"eval_loss": 1.0 + seed % 97 / 100}, "parent": None}))


def _write_safetensors(path: Path, tensors: dict[str, tuple[int, int]], seed: int) -> None:
    # Hand-written so the benchmark needs neither numpy nor torch; float32 payload derived from the seed.
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    payload = hashlib.shake_256(seed.to_bytes(8, "little")).digest(offset)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + payload)


def time_api(reg: Registry, probe: str, version: int, repeat: int) -> list[tuple[str, str, list[float]]]:
    """Return (what, result size, seconds per run) for the Python API, connection already open."""
    calls = [
        ("Registry.list() (every version)", lambda: reg.list()),
        ("Registry.list(domain='legal')", lambda: reg.list(domain="legal")),
        ("Registry.list(latest=True)", lambda: reg.list(latest=True)),
        (f"Registry.show('{probe}')  (latest)", lambda: reg.show(probe)),
        (f"Registry.show('{probe}@{version}')", lambda: reg.show(f"{probe}@{version}")),
        (f"Registry.show('{probe}:stable')", lambda: reg.show(f"{probe}:stable")),
        (f"Registry(path).show('{probe}@{version}')  (open + show)", lambda: Registry(reg.path).show(f"{probe}@{version}")),
    ]
    rows = []
    for what, call in calls:
        result = call()
        rows.append((what, f"{len(result)} entries" if isinstance(result, list) else "1 entry", _times(call, repeat)))
    return rows


def time_cli(registry: str, probe: str, version: int, repeat: int) -> list[tuple[str, str, list[float]]]:
    """Return (command, output size, seconds per run) for CLI commands, Python start-up included."""
    base = [sys.executable, "-m", "peftkit"]
    commands = [
        ("peftkit --version  (start-up alone)", base + ["--version"]),
        ("peftkit registry list", base + ["registry", "list", "--registry", registry]),
        ("peftkit registry list --json", base + ["registry", "list", "--json", "--registry", registry]),
        ("peftkit registry list --domain legal", base + ["registry", "list", "--domain", "legal", "--registry", registry]),
        (f"peftkit registry show {probe}@{version}", base + ["registry", "show", f"{probe}@{version}", "--registry", registry]),
    ]
    rows = []
    for what, cmd in commands:
        out = subprocess.run(cmd, capture_output=True, check=True).stdout
        rows.append((what, f"{len(out.splitlines())} lines", _times(lambda: subprocess.run(cmd, capture_output=True, check=True), repeat)))
    return rows


def _times(call, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def report(args, reg: Registry, fill_seconds: float | None, rows) -> str:
    """Return the Markdown section: command, machine, fill rate and a table of median/p95 times."""
    n = len(reg.list())
    size = sum(p.stat().st_size for p in Path(reg.path).rglob("*") if p.is_file())
    lines = [f"Command: `python -m peftkit.bench.registry_bench --count {args.count} --names {args.names}`",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, no GPU; Python {platform.python_version()}, "
             f"SQLite {sqlite3.sqlite_version}; {platform.system()} {platform.release()}; "
             f"load average {os.getloadavg()[0]:.1f} when timing ended (other work on the machine slows every figure)",
             f"Registry: {n} adapters under {args.names} names, {size / 1e6:.0f} MB on disk (catalog + blobs)."]
    if fill_seconds is not None:
        lines.append(f"Filling it through `Registry.add` (3 files fsynced + one committed transaction each): "
                     f"{fill_seconds:.0f} s, {args.count / fill_seconds:.0f} adds/s.")
    lines += ["", "| call | result | median | p95 |", "| --- | --- | ---: | ---: |"]
    for what, result, times in rows:
        p95 = sorted(times)[max(0, int(round(0.95 * len(times))) - 1)]
        lines.append(f"| `{what}` | {result} | {_duration(statistics.median(times))} | {_duration(p95)} |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.1f} ms"


if __name__ == "__main__":
    raise SystemExit(main())
