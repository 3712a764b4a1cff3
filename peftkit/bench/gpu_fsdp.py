"""`python -m peftkit.bench.gpu_fsdp`: Llama 3.1 8B LoRA and QLoRA under FSDP2 on the GPUs: tokens/s, memory per GPU.

Run it as a plain command: for each method it starts `accelerate launch` with the shipped config peftkit's
`--nproc N --strategy fsdp` uses (configs/accelerate/fsdp-lora.yaml, fsdp-qlora.yaml), one process per GPU; with
one GPU that is still the whole FSDP path (fully_shard, its all-gathers and reduce-scatters, over a mesh of one).
Each rank builds the model as `peftkit.bench.gpu_train` does (the real 8B config, random bf16 weights straight on its
GPU, peftkit's LoRA builder, NF4 with the quant storage in bf16 for QLoRA), lets accelerate shard it, and trains on
packed rows of random tokens with bf16 mixed precision, gradient clipping and AdamW. Warm-up steps are not timed.

Figures: tokens/s over all GPUs (each rank trains its own rows: N GPUs x batch x seq per step); peak memory per
GPU from the sharded model's first step to the last (torch.cuda.max_memory_allocated/reserved, gathered from
every rank), and the peak while building, when each rank briefly holds the whole bf16 model before it is sharded.

`--size tiny` runs the same code on a 2-layer Llama over 2 CPU processes (gloo): the test suite runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peftkit import atomic
from peftkit.bench.train_bench import BenchError
from peftkit.launch import ACCELERATE_CONFIGS

METHODS = ("lora", "qlora")
DEFAULT_SEQ = {"8b": 2048, "tiny": 128}
NA_CPU = "n/a on CPU"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the command line's options (see --help)."""
    p = argparse.ArgumentParser(prog="python -m peftkit.bench.gpu_fsdp", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(DEFAULT_SEQ), default="8b",
                   help="8b: Llama 3.1 8B on the GPUs; tiny: a 2-layer Llama on 2 CPU processes")
    p.add_argument("--nproc", type=int, help="processes (default: every GPU; 2 for tiny on CPUs)")
    p.add_argument("--seq", type=int, help="tokens per packed row (default: 2048 for 8b, 128 for tiny)")
    p.add_argument("--batch", type=int, default=1, help="packed rows per GPU per optimizer step")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--methods", default="lora,qlora", help="comma-separated: lora, qlora")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (off by default)")
    p.add_argument("--out", default="gpu_fsdp.json", help="JSON file for every figure")
    p.add_argument("--rank-out", help=argparse.SUPPRESS)  # set by the launcher for the ranks: where rank 0 writes
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    """Run every method under accelerate launch; return the report (prints a table, writes --out)."""
    import torch

    args = parse_args(argv)
    if args.rank_out:
        return rank_main(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise BenchError(f"--methods {args.methods!r}: choose from {', '.join(METHODS)}")
    gpus = torch.cuda.device_count()
    if args.size == "8b" and not gpus:
        raise BenchError("--size 8b needs CUDA GPUs and torch sees none here; --size tiny runs the same code on 2 CPU "
                         "processes")
    nproc = args.nproc or gpus or 2
    report = {"command": " ".join(["python -m peftkit.bench.gpu_fsdp", *(sys.argv[1:] if argv is None else argv)]),
              "size": args.size, "nproc": nproc, "gpu": torch.cuda.get_device_name(0) if gpus else None,
              "seq": args.seq or DEFAULT_SEQ[args.size], "batch_per_gpu": args.batch, "steps": args.steps,
              "warmup": args.warmup, "checkpointing": args.checkpointing, "results": []}
    for method in methods:
        with tempfile.TemporaryDirectory() as tmp:
            rank_out = Path(tmp) / "rank0.json"
            config = ACCELERATE_CONFIGS / f"fsdp-{method}.yaml"
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
                   str(nproc), "-m", "peftkit.bench.gpu_fsdp", *(argv if argv is not None else sys.argv[1:]),
                   "--methods", method, "--rank-out", str(rank_out)]
            started = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if rank_out.is_file():
                result = json.loads(rank_out.read_text(encoding="utf-8"))
            else:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                result = {"method": method, "status": f"error (exit {done.returncode}): {last[:300]}"}
            result["wall_seconds"] = time.perf_counter() - started
        report["results"].append(result)
        print(f"   {method}: {result['status']}", flush=True)
    print(table(report))
    atomic.write_json(args.out, report)
    return report


def rank_main(args: argparse.Namespace) -> None:
    """Build, shard and train one method on this rank; rank 0 writes the gathered figures to --rank-out."""
    import torch
    from accelerate import Accelerator

    from peftkit.bench import gpu_train_parts as parts
    from peftkit.distributed import allow_fsdp_on_cpu, local_rank
    from peftkit.packed_attention import packed_attention

    allow_fsdp_on_cpu()
    gpu = torch.cuda.is_available()
    device = f"cuda:{local_rank()}" if gpu else "cpu"
    if gpu:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if gpu else torch.float32
    accelerator = Accelerator(cpu=not gpu, mixed_precision="bf16" if gpu else "no")
    method, seq = args.methods, args.seq or DEFAULT_SEQ[args.size]
    model, parameters = parts.build_model(method, parts.model_config(args.size), device=device, dtype=dtype,
                                          attn="sdpa", checkpointing=args.checkpointing)
    build_peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else NA_CPU
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches, _ = parts.packed_batches(4, batch=args.batch, seq=seq, vocab=parts.model_config(args.size).vocab_size,
                                      attn="sdpa", device=device, seed=accelerator.process_index)
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses = []
    with packed_attention(model, True):
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                synchronize(gpu)
                timed_from = time.perf_counter()
            loss = model(**batches[step % len(batches)]).loss  # through the root FSDP forward, as peftkit train does
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        synchronize(gpu)
    seconds = time.perf_counter() - timed_from
    memory = torch.tensor([torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30]
                          if gpu else [0.0, 0.0], device=device)
    per_rank = accelerator.gather(memory[None]).tolist()
    if accelerator.is_main_process:
        tokens = accelerator.num_processes * args.batch * seq * args.steps
        atomic.write_json(args.rank_out, {
            "method": method, "status": "ok", "processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "parameters": parameters,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "seconds_per_step": seconds / args.steps, "tokens_per_second": tokens / seconds,
            "tokens_per_second_per_gpu": tokens / seconds / accelerator.num_processes,
            "loss_first": losses[0], "loss_last": losses[-1], "build_peak_allocated_gib_rank0": build_peak,
            "peak_allocated_gib_per_gpu": [r[0] for r in per_rank] if gpu else NA_CPU,
            "peak_reserved_gib_per_gpu": [r[1] for r in per_rank] if gpu else NA_CPU})
    accelerator.wait_for_everyone()
    accelerator.end_training()


def synchronize(gpu: bool) -> None:
    """Wait for the GPU's queued work (nothing on the CPU), so a clock reading covers it."""
    import torch

    if gpu:
        torch.cuda.synchronize()


def table(report: dict) -> str:
    """Return the results as a markdown table."""
    def gib(values) -> str:
        return " / ".join(f"{v:.1f}" for v in values) if isinstance(values, list) else str(values)

    lines = [f"{report['gpu'] or 'CPU'} x {report['nproc']}, FSDP2, {report['batch_per_gpu']} x {report['seq']} packed "
             f"tokens per GPU a step, {report['steps']} timed steps after {report['warmup']}, checkpointing "
             f"{'on' if report['checkpointing'] else 'off'}.", "",
             "| method | tokens/s (all GPUs) | tokens/s per GPU | s/step | peak alloc GiB per GPU | "
             "peak reserved GiB per GPU | build peak GiB |", "|---|--:|--:|--:|--:|--:|--:|"]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status'].replace('|', '/')} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['tokens_per_second']:,.0f} | {r['tokens_per_second_per_gpu']:,.0f} | "
                     f"{r['seconds_per_step']:.3f} | {gib(r['peak_allocated_gib_per_gpu'])} | "
                     f"{gib(r['peak_reserved_gib_per_gpu'])} | {gib(r['build_peak_allocated_gib_rank0'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.exit(f"error: {exc}")
