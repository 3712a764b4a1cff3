"""Bounded load test of `peftkit serve` on loopback: throughput, p50/p99 latency and errors, mixed vs single adapter.

    python -m peftkit.bench.serve_load --adapters 8 --requests 64 --concurrency 8 --max-tokens 32

By default it builds its own setup: N LoRA adapters with random weights for the base model in a
temporary registry, and a server on 127.0.0.1 (a free port). It then sends the same number of
chat requests at the same concurrency three ways: spread over all adapters (one mixed batch),
all to one adapter, and spread over all adapters with mixing turned off (--no-mix: one batch per
adapter). With --methods it adds a scenario spread over 8 adapters of every method (two LoRA,
prefix, prompt, DoRA, IA3, bottleneck, full): prefix and prompt rows join the LoRA batch, the other
four run a batch each. Every run is bounded by --requests and by --max-seconds of wall time; each
adapter is warmed up first, so loading time is not counted. With --url it measures a server you
started (loopback addresses only), sending --models.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from peftkit.methods.catalog import CATALOG, LORA

PROMPTS = ["What reference number is the Cairn poles listed under?", "Do you ship to Norway, and how long does it take?",
           "My tent pole snapped on the first trip. Is that covered?", "Which sleeping bag is warmest for winter camping?",
           "Can I return boots I have worn outside once?", "How do I reset the head torch to its factory mode?",
           "Is there anywhere in your range for paddleboards?", "What is the warranty on the Ridge 45 pack?"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="smollm2-135m-instruct", help="base model (alias, folder or hub id)")
    p.add_argument("--adapters", type=int, default=8, help="LoRA adapters to build and spread requests over (>= 8)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="requests per scenario (fixed count)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=300.0, help="wall-time cap per scenario; unsent requests are dropped")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--threads", type=int, help="torch CPU threads for the engine (default: torch's choice)")
    p.add_argument("--skip-no-mix", action="store_true", help="skip the one-batch-per-adapter comparison")
    p.add_argument("--methods", action="store_true",
                   help="add a scenario over adapters of every method (prefix, prompt, DoRA, IA3, bottleneck, full)")
    p.add_argument("--url", help="measure a running server instead (http://127.0.0.1:PORT; loopback only)")
    p.add_argument("--api-key", default=os.environ.get("PEFTKIT_API_KEY"))
    p.add_argument("--models", help="with --url: comma-separated model names to spread requests over")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON to this file")
    return p.parse_args(argv)


def check_loopback(url: str) -> None:
    """Refuse any target that is not this machine: the load script never sends traffic elsewhere."""
    from peftkit.serving.server import is_loopback

    if not is_loopback(urlparse(url).hostname or ""):
        raise SystemExit(f"--url {url}: only loopback addresses (127.0.0.1, ::1, localhost) are allowed")


async def run_scenario(url: str, api_key: str | None, models: list[str], requests: int, concurrency: int,
                       max_tokens: int, max_seconds: float) -> dict:
    """Return throughput, latency percentiles and error counts for `requests` chat requests over `models`."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies, tokens, errors = [], 0, {}
    queue = list(range(requests))
    started = time.perf_counter()
    deadline = started + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue and time.perf_counter() < deadline:
            i = queue.pop(0)
            body = {"model": models[i % len(models)], "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
            sent = time.perf_counter()
            try:
                r = await client.post("/v1/chat/completions", json=body, timeout=max(1.0, deadline - sent))
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - sent)
                    tokens += r.json()["usage"]["completion_tokens"]
                else:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    pct = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")  # noqa: E731
    return {"models": len(set(models)), "requests": requests, "ok": len(latencies), "errors": errors,
            "unsent": len(queue), "wall_s": wall, "requests_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall,
            "completion_tokens": tokens, "p50_s": pct(0.50), "p99_s": pct(0.99),
            "mean_s": statistics.fmean(latencies) if latencies else float("nan")}


def build_setup(args, workdir: Path) -> tuple[str, list[str]]:
    """Return (registry folder, adapter names) after saving args.adapters random LoRA adapters for the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from peftkit.models import load_base, resolve_model
    from peftkit.registry import Registry

    registry = Registry(workdir / "registry")
    model = get_peft_model(load_base(args.base, dtype="fp32"), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    names = []
    for i in range(args.adapters):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():  # small random B: each adapter changes the model a little, as trained ones do
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        folder = workdir / f"bench-{i}"
        model.save_pretrained(folder)
        registry.add(folder, name=f"bench-{i}", base_model_dir=resolve_model(args.base))
        names.append(f"bench-{i}")
    registry.close()
    return str(workdir / "registry"), names


# The --methods scenario's other adapters: every catalog method except the plain LoRA kind (build_setup's adapters
# are that kind) and those on a 4-bit base (qlora needs bitsandbytes on a GPU): dora, prefix, prompt, ia3, bottleneck, full.
OTHER_METHODS = tuple(m.name for m in CATALOG.values() if m.serve_kind != LORA and not m.quantized_base)


def random_method_adapter(base: str | Path, out: Path, method: str, seed: int, scale: float, **fields) -> Path:
    """Save an adapter of any method for base whose trainable weights got Gaussian noise of std scale (so it is not a no-op)."""
    import torch

    from peftkit.config import MethodConfig
    from peftkit.methods import build_method
    from peftkit.models import load_base

    torch.manual_seed(seed)  # the methods' own random starts (prefix, prompt) too
    model = build_method(load_base(str(base), dtype="fp32"), MethodConfig(name=method, **fields))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_method_adapters(args, workdir: Path) -> list[str]:
    """Return the names of one adapter per method in OTHER_METHODS, saved for the base and added to the registry."""
    from peftkit.models import resolve_model
    from peftkit.registry import Registry

    registry = Registry(workdir / "registry")
    for i, method in enumerate(OTHER_METHODS):
        folder = random_method_adapter(args.base, workdir / f"method-{method}", method, seed=1000 + i,
                                       scale=0.001 if method == "full" else 0.01)
        registry.add(folder, name=f"method-{method}", base_model_dir=resolve_model(args.base))
    registry.close()
    return [f"method-{m}" for m in OTHER_METHODS]


def serve_and_measure(args, registry: str, names: list[str], mix: bool, scenarios: list[tuple[str, list[str]]]) -> dict:
    """Return {scenario: results} measured against a fresh in-process server (mixing on or off)."""
    from peftkit.serving.app import create_app
    from peftkit.serving.engine import Engine
    from peftkit.serving.server import start_background
    from peftkit.serving.settings import ServeSettings

    served = sorted({m for _, models in scenarios for m in models} | set(names))
    settings = ServeSettings(args.base, registry=registry, dtype=args.dtype, max_loaded_adapters=len(served),
                             max_batch_size=max(16, args.concurrency), mix=mix, threads=args.threads,
                             max_concurrent=4 * args.concurrency)
    engine = Engine(settings).start()
    server = start_background(create_app(engine, settings))
    try:
        warm = [args.base] + served  # load every adapter once: loading is not what this measures
        asyncio.run(run_scenario(server.url, None, warm, len(warm), 1, 2, args.max_seconds))
        out = {}
        for label, models in scenarios:
            out[label] = asyncio.run(run_scenario(server.url, None, models, args.requests, args.concurrency,
                                                  args.max_tokens, args.max_seconds))
            out[label]["batch_rows_mean"] = _mean_batch(engine.snapshot()["batch_sizes"])
            engine.batch_sizes.clear()
        return out
    finally:
        server.stop()
        engine.stop()


def _mean_batch(sizes: dict[int, int]) -> float:
    return sum(s * n for s, n in sizes.items()) / max(1, sum(sizes.values()))


def machine() -> str:
    """Return a one-line description of this machine (CPU, cores, load, torch version, GPU)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{cpu}, {os.cpu_count()} cores (load average {load}), torch {torch.__version__}, {device}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.url:
        check_loopback(args.url)
        models = [m for m in (args.models or "").split(",") if m]
        if not models:
            raise SystemExit("--url needs --models a,b,c")
        results = {"custom": asyncio.run(run_scenario(args.url, args.api_key, models, args.requests, args.concurrency,
                                                      args.max_tokens, args.max_seconds))}
    else:
        if args.adapters < 8:
            raise SystemExit("--adapters must be at least 8")
        with tempfile.TemporaryDirectory(prefix="peftkit-serve-load-") as tmp:
            registry, names = build_setup(args, Path(tmp))
            scenarios = [("mixed", names), ("single", names[:1])]
            if args.methods:
                scenarios.append(("every method", names[:2] + build_method_adapters(args, Path(tmp))))
            results = serve_and_measure(args, registry, names, True, scenarios)
            if not args.skip_no_mix:
                results["one batch per adapter"] = serve_and_measure(args, registry, names, False, [("grouped", names)])["grouped"]
    print(f"machine: {machine()}")
    print(f"base {args.base}, {args.requests} requests per scenario, concurrency {args.concurrency}, "
          f"max_tokens {args.max_tokens}, temperature 0, engine threads {args.threads or 'default'}, dtype {args.dtype}")
    print(f"{'scenario':24} {'adapters':>8} {'ok':>4} {'errors':>6} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} {'rows/fwd':>8}")
    for label, r in results.items():
        errors = sum(r["errors"].values()) + r["unsent"]
        print(f"{label:24} {r['models']:>8} {r['ok']:>4} {errors:>6} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>7.1f} "
              f"{r['p50_s']:>7.2f} {r['p99_s']:>7.2f} {r.get('batch_rows_mean', float('nan')):>8.2f}")
    if "mixed" in results and "single" in results:
        print(f"mixed / single throughput: {results['mixed']['tokens_per_s'] / results['single']['tokens_per_s']:.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": machine(), "args": vars(args), "results": results}, indent=2))
    return 0 if all(not r["errors"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
