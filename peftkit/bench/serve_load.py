"""Bounded load test of `peftkit serve` on loopback beside the loop a user would write: throughput, latency, errors.

    python -m peftkit.bench.serve_load --adapters 64 --requests 64 --concurrency 8 --max-tokens 32 --methods

By default it builds its own setup: N LoRA adapters with random weights for the base model in a
temporary registry, and a server on 127.0.0.1 (a free port). It then sends the same requests at the
same concurrency several ways: "naive", transformers `generate` one request at a time with peft
`set_adapter` over the first 8 adapters (peftkit.bench.naive_generate: in-process, no HTTP, one
generate at a time as behind a lock); "single", all to one adapter; "mixed 8" over the first 8
adapters and "mixed N" over all N (one mixed batch); with --methods "every method", spread over 8
adapters of every method (two LoRA, prefix, prompt, DoRA, IA3, bottleneck, full: prefix and prompt
rows join the LoRA batch, the other four run a batch each); and "one batch per adapter", the first 8
adapters with mixing turned off (--no-mix). Requests to the server are streamed: time to first token
(TTFT) is when the first non-empty content chunk arrives, time per output token (TPOT) is (time of the
chunk carrying finish_reason - TTFT) / (completion tokens - 1). Every run is bounded by --requests and
by --max-seconds of wall time; each adapter is warmed up first, so loading time is not counted. With
--url it measures a server you started (loopback addresses only), sending --models.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from peftkit.bench.naive_generate import Timing, request
from peftkit.bench.serve_report import summarize
from peftkit.methods.catalog import CATALOG, LORA

PROMPTS = ["What reference number is the Cairn poles listed under?", "Do you ship to Norway, and how long does it take?",
           "My tent pole snapped on the first trip. Is that covered?", "Which sleeping bag is warmest for winter camping?",
           "Can I return boots I have worn outside once?", "How do I reset the head torch to its factory mode?",
           "Is there anywhere in your range for paddleboards?", "What is the warranty on the Ridge 45 pack?"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="smollm2-135m-instruct", help="base model (alias, folder or hub id)")
    p.add_argument("--adapters", type=int, default=8,
                   help="LoRA adapters to build (>= 8): \"mixed 8\" uses the first 8, \"mixed N\" all of them")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="requests per scenario (fixed count)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=300.0, help="wall-time cap per scenario; unsent requests are dropped")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--threads", type=int, help="torch CPU threads for the engine and the naive loop (default: torch's choice)")
    p.add_argument("--skip-no-mix", action="store_true", help="skip the one-batch-per-adapter comparison")
    p.add_argument("--skip-naive", action="store_true",
                   help="skip the baseline of transformers generate one request at a time with peft set_adapter")
    p.add_argument("--methods", action="store_true",
                   help="add a scenario over adapters of every method (prefix, prompt, DoRA, IA3, bottleneck, full)")
    p.add_argument("--system-words", type=int, default=0,
                   help="start every request with a system message of this many words (one text for all: a long "
                        "shared system prompt, as chat deployments have)")
    p.add_argument("--compare-prefix-cache", action="store_true",
                   help='add "no prefix cache 8": mixed 8 on a server with the prompt-prefix cache off')
    p.add_argument("--batch-invariant", action="store_true",
                   help='add "batch-invariant 8": mixed 8 on a server started with --batch-invariant')
    p.add_argument("--url", help="measure a running server instead (http://127.0.0.1:PORT; loopback only)")
    p.add_argument("--api-key", default=os.environ.get("PEFTKIT_API_KEY"))
    p.add_argument("--models", help="with --url: comma-separated model names to spread requests over")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON to this file")
    p.add_argument("--markdown", help="also write the table and ratios as markdown to this file (for docs/benchmarks.md)")
    return p.parse_args(argv)


SYSTEM = ("You are the support assistant of Fernhill Outfitters, a shop for tents, boots, packs, stoves and "
          "sleeping bags. Answer in two sentences at most, name the product, quote prices in euros, never promise "
          "delivery dates, point to the returns page for returns, and ask for the order number when one is needed.")


def system_prompt(args) -> str | None:
    """Return the shared system message of --system-words words (SYSTEM repeated), or None without it."""
    if not args.system_words:
        return None
    words = SYSTEM.split()
    return " ".join(words[i % len(words)] for i in range(args.system_words))


def check_loopback(url: str) -> None:
    """Refuse any target that is not this machine: the load script never sends traffic elsewhere."""
    from peftkit.serving.server import is_loopback

    if not is_loopback(urlparse(url).hostname or ""):
        raise SystemExit(f"--url {url}: only loopback addresses (127.0.0.1, ::1, localhost) are allowed")


async def run_scenario(url: str, api_key: str | None, models: list[str], requests: int, concurrency: int,
                       max_tokens: int, max_seconds: float, system: str | None = None) -> dict:
    """Return summarize()'s figures for `requests` streamed chat requests over `models`, `concurrency` in flight."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timings, errors = [], {}
    queue = list(range(requests))
    started = time.perf_counter()
    deadline = started + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while queue and time.perf_counter() < deadline:
            model, messages = request(queue.pop(0), models, PROMPTS, system)
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, "messages": messages}
            try:
                timing, error = await stream_one(client, body, max(1.0, deadline - time.perf_counter()))
            except httpx.HTTPError as exc:
                timing, error = None, type(exc).__name__
            if timing is not None:
                timings.append(timing)
            else:
                errors[error] = errors.get(error, 0) + 1

    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return summarize(timings, time.perf_counter() - started, models, requests, len(queue), errors)


async def stream_one(client, body: dict, timeout: float) -> tuple[Timing | None, str | None]:
    """Return (Timing, None) for one streamed chat completion, or (None, why) when it failed."""
    sent = time.perf_counter()
    first = last = None
    tokens = chunks = 0
    async with client.stream("POST", "/v1/chat/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            return None, str(r.status_code)
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk, now = json.loads(line[6:]), time.perf_counter()
            if "error" in chunk:
                return None, "stream error"
            for choice in chunk.get("choices") or []:
                if choice["delta"].get("content"):  # the first chunk holds only the role
                    first, chunks = first or now, chunks + 1
                if choice.get("finish_reason"):
                    last = now
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    if last is None:
        return None, "stream cut short"
    tokens = tokens or chunks  # a server without stream_options.include_usage: one token per content chunk
    # A reply that is only the stop token has no content chunk: its first token is its last.
    return Timing(sent, first or last, last, time.perf_counter(), tokens), None


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


def serve_and_measure(args, registry: str, names: list[str], scenarios: list[tuple[str, list[str]]], **overrides) -> dict:
    """Return {scenario: results} measured against a fresh in-process server (overrides: ServeSettings fields, e.g. mix)."""
    from peftkit.serving.app import create_app
    from peftkit.serving.engine import Engine
    from peftkit.serving.server import start_background
    from peftkit.serving.settings import ServeSettings

    served = sorted({m for _, models in scenarios for m in models} | set(names))
    settings = ServeSettings(args.base, registry=registry, dtype=args.dtype, max_loaded_adapters=len(served),
                             max_batch_size=max(16, args.concurrency), threads=args.threads,
                             max_concurrent=4 * args.concurrency, **overrides)
    engine = Engine(settings).start()
    server = start_background(create_app(engine, settings))
    try:
        warm = [args.base] + served  # load every adapter once: loading is not what this measures
        asyncio.run(run_scenario(server.url, None, warm, len(warm), 1, 2, args.max_seconds))
        engine.batch_sizes.clear()  # so the first scenario's rows per forward leave the warm-up out
        out, hits = {}, engine.snapshot()["prefix_cache_hits"]
        for label, models in scenarios:
            out[label] = asyncio.run(run_scenario(server.url, None, models, args.requests, args.concurrency,
                                                  args.max_tokens, args.max_seconds, system_prompt(args)))
            snap = engine.snapshot()
            out[label]["batch_rows_mean"] = _mean_batch(snap["batch_sizes"])
            out[label]["prefix_cache_hits"] = snap["prefix_cache_hits"] - hits  # requests that started from a cached head
            hits = snap["prefix_cache_hits"]
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


def measure_local(args) -> dict:
    """Return {scenario: results} for every scenario, on a registry of args.adapters random LoRA adapters built here."""
    if args.adapters < 8:
        raise SystemExit(f"--adapters {args.adapters}: the mixed scenarios need at least 8; pass --adapters 8 or more")
    with tempfile.TemporaryDirectory(prefix="peftkit-serve-load-") as tmp:
        registry, names = build_setup(args, Path(tmp))
        results = {} if args.skip_naive else {"naive": naive_scenario(args, registry, names[:8])}
        scenarios = [("single", names[:1]), ("mixed 8", names[:8])]
        if len(names) > 8:
            scenarios.append((f"mixed {len(names)}", names))
        if args.methods:
            scenarios.append(("every method", names[:2] + build_method_adapters(args, Path(tmp))))
        results |= serve_and_measure(args, registry, names, scenarios)
        # Each beside "mixed 8": the same requests over the first 8 adapters, on a server set up otherwise.
        others = [("one batch per adapter", not args.skip_no_mix, {"mix": False}),
                  ("no prefix cache 8", args.compare_prefix_cache, {"prefix_cache_mib": 0}),
                  ("batch-invariant 8", args.batch_invariant, {"batch_invariant": True})]
        for label, wanted, overrides in others:
            if wanted:
                results[label] = serve_and_measure(args, registry, names[:8], [(label, names[:8])], **overrides)[label]
    return results


def naive_scenario(args, registry: str, names: list[str]) -> dict:
    """Return summarize()'s figures for the requests answered by transformers generate one at a time (naive_generate)."""
    import gc

    from peftkit.bench.naive_generate import run_naive

    timings, wall, unsent = run_naive(args.base, registry, names, PROMPTS, requests=args.requests,
                                      concurrency=args.concurrency, max_tokens=args.max_tokens,
                                      max_seconds=args.max_seconds, dtype=args.dtype, threads=args.threads,
                                      system=system_prompt(args))
    gc.collect()  # free its copy of the base before the server loads one
    return summarize(timings, wall, names, args.requests, unsent, {}) | {"batch_rows_mean": 1.0}


def main(argv=None) -> int:
    from peftkit.bench.serve_report import markdown_table, ratio_lines, ratios, text_table

    args = parse_args(argv)
    if args.url:
        check_loopback(args.url)
        models = [m for m in (args.models or "").split(",") if m]
        if not models:
            raise SystemExit("--url needs --models a,b,c")
        results = {"custom": asyncio.run(run_scenario(args.url, args.api_key, models, args.requests, args.concurrency,
                                                      args.max_tokens, args.max_seconds, system_prompt(args)))}
    else:
        results = measure_local(args)
    header = [f"machine: {machine()}",
              f"base {args.base}, {args.requests} requests per scenario, concurrency {args.concurrency}, max_tokens "
              f"{args.max_tokens}, temperature 0, engine threads {args.threads or 'default'}, dtype {args.dtype}, system "
              f"message {args.system_words} words"]
    print("\n".join(header + [text_table(results)] + ratio_lines(results)))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": machine(), "args": vars(args), "results": results,
                                                   "ratios": ratios(results)}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text("\n\n".join([markdown_table(results), "\n".join(f"- {line}" for line in
                                                                                      ratio_lines(results) + header)]) + "\n")
    return 0 if all(not r["errors"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
