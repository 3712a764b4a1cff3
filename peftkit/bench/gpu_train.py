"""`python -m peftkit.bench.gpu_train`: LoRA and QLoRA training speed, MFU and peak memory of Llama 3.1 8B on one GPU.

Nothing is downloaded: the Llama-3.1-8B architecture is built from its real config
(peftkit.methods.footprint.llama31_8b_config) with random bf16 weights, directly on the GPU. Each
configuration (method x gradient checkpointing) builds a fresh model, wraps it with peftkit's own
builder (LoRA r=16, alpha 32, dropout 0.05 on every linear layer; QLoRA the same on a 4-bit NF4 base,
see gpu_train_parts.quantize_nf4), and trains on packed rows of random examples (position_ids restart
per example; flash-attention varlen when flash_attn is installed, else SDPA split per example by
peftkit.packed_attention) with the loss `peftkit train` computes, gradient clipping and an AdamW step.
Warm-up steps are not timed; the timed steps sit between torch.cuda.synchronize calls.

MFU = 4 x N x tokens/s / peak, N the base model's parameters (8.03e9): per token a LoRA step does 2N
FLOPs forward and 2N for the activation gradients (frozen weights need no weight gradients; the
adapters' FLOPs, under 1%, and the attention scores are not counted; checkpointing's recomputation is
work done but not credited). Two peaks: the H200's nominal dense bf16 989 TFLOP/s, and a bf16 matmul
measured in the same run. Peak memory is torch.cuda.max_memory_allocated/reserved from the end of
the model's build (QLoRA's transient bf16 copy excluded) to the last step.

`--size tiny` runs the same code on a 2-layer Llama (hidden 64, 128 tokens a row), on the CPU where
there is no GPU (fp32; the GPU-only figures read "n/a on CPU"): the test suite runs it.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
from importlib import metadata

from peftkit import atomic
from peftkit.bench import gpu_train_parts as parts
from peftkit.bench.train_bench import BenchError

H200_BF16_PEAK = 989e12
"""Nominal dense (no sparsity) bf16 tensor-core peak of an H200, in FLOP/s; the H100 SXM's is the same."""
LORA_MFU_TARGET = 0.40
"""NeMo reports 40.6% MFU for Llama 3 8B LoRA on one H100."""
QLORA_PEAK_TARGET_GIB = 8.0
"""torchtune reports 7.4 GiB peak memory for Llama 3.1 8B QLoRA at batch 1."""
MFU_FORMULA = ("MFU = 4 x N x tokens/s / peak FLOP/s, N = base parameters (LoRA: 2N forward + 2N activation-gradient "
               "FLOPs per token; adapters, attention scores and checkpointing's recomputation not counted)")
NA_CPU = "n/a on CPU"
METHODS = ("lora", "qlora")
CHECKPOINTING = {"both": (False, True), "on": (True,), "off": (False,)}
DEFAULT_SEQ = {"8b": 2048, "tiny": 128}
COLUMNS = (("tokens_per_second", "tokens/s", ",.0f"), ("seconds_per_step", "s/step", ".3f"),
           ("mfu_vs_h200_peak", "MFU (989 TFLOP/s)", ".1%"), ("mfu_vs_matmul_peak", "MFU (measured peak)", ".1%"),
           ("model_gib", "model GiB", ".2f"), ("peak_allocated_gib", "peak alloc GiB", ".2f"),
           ("peak_reserved_gib", "peak reserved GiB", ".2f"))
DISTINCT_BATCHES = 4  # cycled through the steps: different packings without building a batch per step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the command line's options (see --help)."""
    p = argparse.ArgumentParser(prog="python -m peftkit.bench.gpu_train", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(DEFAULT_SEQ), default="8b",
                   help="8b: Llama 3.1 8B on the GPU; tiny: a 2-layer Llama, on the CPU without a GPU")
    p.add_argument("--seq", type=int, help="tokens per packed row (default: 2048 for 8b, 128 for tiny)")
    p.add_argument("--batch", type=int, default=1, help="packed rows per optimizer step")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernel choice, allocator growth)")
    p.add_argument("--methods", default="lora,qlora", help="comma-separated: lora, qlora")
    p.add_argument("--checkpointing", choices=list(CHECKPOINTING), default="both", help="gradient checkpointing")
    p.add_argument("--liger", action="store_true", help="Liger kernels for RMSNorm, SwiGLU and RoPE, if installed")
    p.add_argument("--budget-minutes", type=float, default=8.0, help="start no configuration after this long")
    p.add_argument("--out", default="gpu_train.json", help="JSON file for every figure")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Return the report of every configuration; prints the table and writes --out."""
    import torch

    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise BenchError(f"--methods {args.methods!r}: {', '.join(map(repr, unknown)) or 'nothing'} is not measured "
                         f"here; choose from {', '.join(METHODS)}")
    if min(args.steps, args.batch, args.seq or 2) < 1 or args.warmup < 0:
        raise BenchError(f"--steps {args.steps}, --batch {args.batch} and --seq {args.seq} must be at least 1 "
                         f"(--seq at least 2) and --warmup {args.warmup} at least 0")
    if args.size == "8b" and not torch.cuda.is_available():
        raise BenchError("--size 8b needs a CUDA GPU (Llama 3.1 8B is built on the GPU: 16 GB of bf16 weights) and "
                         "torch sees none here; run --size tiny for the same code on a 2-layer model on the CPU")
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    attn = "flash_attention_2" if device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    setup = {"config": parts.model_config(args.size), "device": device, "dtype": dtype, "attn": attn,
             "seq": args.seq or DEFAULT_SEQ[args.size], "batch": args.batch, "steps": args.steps, "warmup": args.warmup}
    command = " ".join(["python -m peftkit.bench.gpu_train", *(sys.argv[1:] if argv is None else argv)])
    report = header(command, args.size, setup, liger=apply_liger(args.liger),
                    matmul_peak=parts.matmul_peak(device, dtype, 1.0 if args.size == "8b" else 0.2))
    for method in methods:
        for checkpointing in CHECKPOINTING[args.checkpointing]:
            if time.perf_counter() - started > args.budget_minutes * 60:
                result = {"method": method, "checkpointing": checkpointing,
                          "status": f"skipped: the {args.budget_minutes:g}-minute budget (--budget-minutes) was spent"}
            else:
                result = run_config(method, checkpointing, **setup)
            report["results"].append(judge(result, report, args.size))
            print(f"   {method} checkpointing={'on' if checkpointing else 'off'}: {result['status']}", flush=True)
    report["total_seconds"] = time.perf_counter() - started
    print(table(report))
    atomic.write_json(args.out, report)
    return report


def header(command: str, size: str, setup: dict, *, liger: str, matmul_peak: float) -> dict:
    """Return the report's fields common to every configuration: machine, versions, settings, peaks, targets."""
    import torch

    gpu = setup["device"] == "cuda"
    attention = ("flash_attention_2: varlen over the packed examples" if setup["attn"] != "sdpa"
                 else "sdpa, one call per packed example (peftkit.packed_attention)")
    return {"command": command, "size": size, "device": setup["device"],
            "gpu": torch.cuda.get_device_name(0) if gpu else None, "dtype": str(setup["dtype"]).removeprefix("torch."),
            "seq": setup["seq"], "batch": setup["batch"], "steps": setup["steps"], "warmup": setup["warmup"],
            "attention": attention, "liger": liger, "lora": dict(parts.LORA), "versions": versions(),
            "mfu_formula": MFU_FORMULA,
            "peak_flops": {"h200_bf16_nominal": H200_BF16_PEAK if gpu else NA_CPU, "measured_matmul": matmul_peak},
            "targets": {"lora_mfu": f">= {LORA_MFU_TARGET:.0%} (NeMo: 40.6% for 8B LoRA on one H100)",
                        "qlora_peak_gib": f"<= {QLORA_PEAK_TARGET_GIB:g} GiB at batch 1 (torchtune: 7.4 GiB)"},
            "results": []}


def run_config(method: str, checkpointing: bool, **setup) -> dict:
    """Return one configuration's figures, or its status "OOM: ..." / "error: ..." so the others still run."""
    import torch

    result: dict = {"method": method, "checkpointing": checkpointing}
    try:
        result.update(measure(method, checkpointing, **setup), status="ok")
    except torch.OutOfMemoryError as exc:
        result["status"] = "OOM: " + str(exc).splitlines()[0][:300]
    except Exception as exc:  # noqa: BLE001 - one configuration's failure is a result, not the end of the run
        result["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
    gc.collect()  # the failed step's frames are gone by now: free their tensors before the next model
    if setup["device"] == "cuda":
        torch.cuda.empty_cache()
    return result


def measure(method: str, checkpointing: bool, *, config, device: str, dtype, attn: str, seq: int, batch: int,
            steps: int, warmup: int) -> dict:
    """Return tokens/s, step time, parameters and peak memory of training method on a freshly built model."""
    import torch

    from peftkit.packed_attention import packed_attention

    model, parameters = parts.build_model(method, config, device=device, dtype=dtype, attn=attn,
                                          checkpointing=checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    batches, examples_per_row = parts.packed_batches(DISTINCT_BATCHES, batch=batch, seq=seq, vocab=config.vocab_size,
                                                     attn=attn, device=device)
    gpu = device == "cuda"
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model_gib = torch.cuda.memory_allocated() / 2**30 if gpu else NA_CPU  # weights, adapter, batches; no optimizer state
    losses = []
    with packed_attention(model, True):
        for step in range(warmup + steps):
            if step == warmup:
                synchronize(device)
                timed_from = time.perf_counter()
            losses.append(parts.train_step(model, optimizer, trainable, batches[step % len(batches)]))
        synchronize(device)
    seconds = time.perf_counter() - timed_from
    return {"parameters": parameters, "trainable_parameters": sum(p.numel() for p in trainable),
            "linear4bit_layers": parts.count_4bit(model),
            "examples_per_row": examples_per_row, "tokens_per_step": batch * seq, "seconds_per_step": seconds / steps,
            "tokens_per_second": steps * batch * seq / seconds,
            "loss_first": float(losses[0]), "loss_last": float(losses[-1]), "model_gib": model_gib,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else NA_CPU,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if gpu else NA_CPU}


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work (a no-op on the CPU), so a clock reading covers it."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def lora_flops(parameters: int, tokens: float) -> float:
    """Return the model FLOPs of LoRA training on tokens: 4 x N per token (see MFU_FORMULA)."""
    return 4 * parameters * tokens


def judge(result: dict, report: dict, size: str) -> dict:
    """Return result with its MFU against both peaks and whether it meets its method's target (8b only)."""
    if result["status"] != "ok":
        return result
    flops_per_second = lora_flops(result["parameters"], result["tokens_per_second"])
    nominal = report["peak_flops"]["h200_bf16_nominal"]
    result["mfu_vs_matmul_peak"] = flops_per_second / report["peak_flops"]["measured_matmul"]
    result["mfu_vs_h200_peak"] = flops_per_second / nominal if isinstance(nominal, float) else NA_CPU
    if size != "8b":
        result["target_met"] = "n/a: tiny model"
    elif result["method"] == "lora":
        result["target_met"] = result["mfu_vs_h200_peak"] >= LORA_MFU_TARGET
    else:
        batch_one = report["batch"] == 1
        result["target_met"] = result["peak_allocated_gib"] <= QLORA_PEAK_TARGET_GIB if batch_one else "n/a: batch > 1"
    return result


def apply_liger(wanted: bool) -> str:
    """Return what --liger did: patched transformers' Llama modules (before any model is built), or why not."""
    if not wanted:
        return "off"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger not installed"
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    # The fused linear cross-entropy stays off: the loss measured is peftkit's own chunked one.
    apply_liger_kernel_to_llama(rms_norm=True, swiglu=True, rope=True, fused_linear_cross_entropy=False)
    return f"liger_kernel {metadata.version('liger_kernel')}: rms_norm, swiglu, rope"


def versions() -> dict:
    """Return the installed versions of the libraries the figures depend on ("not installed" where absent)."""
    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "flash_attn", "liger_kernel"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def table(report: dict) -> str:
    """Return the results as a markdown table, with the targets beside them."""
    def cell(value, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    peak, targets = report["peak_flops"]["measured_matmul"], report["targets"]
    lines = [f"{report['gpu'] or report['device']}, {report['dtype']}, {report['batch']} x {report['seq']} packed "
             f"tokens a step, {report['steps']} timed steps after {report['warmup']}; attention: {report['attention']}; "
             f"liger: {report['liger']}; measured matmul peak {peak / 1e12:.3g} TFLOP/s.", MFU_FORMULA + ".",
             f"Targets: LoRA MFU {targets['lora_mfu']}; QLoRA peak {targets['qlora_peak_gib']}.", "",
             "| method | checkpointing | " + " | ".join(title for _, title, _ in COLUMNS) + " | target met |",
             "|---|---|" + "--:|" * len(COLUMNS) + "---|"]
    for r in report["results"]:
        head = f"| {r['method']} | {'on' if r['checkpointing'] else 'off'} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status'].replace('|', '/')} |" + " |" * len(COLUMNS))
            continue
        lines.append(head + " " + " | ".join([cell(r[key], fmt) for key, _, fmt in COLUMNS] + [str(r["target_met"])]) + " |")
    return "\n".join(lines)

if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        sys.exit(f"error: {exc}")
