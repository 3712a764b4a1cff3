"""`peftkit bench train`: the seed recipe, TRL's SFTTrainer and peftkit, trained on one budget and measured alike.

Every recipe trains the same model on the same rows with the same LoRA settings, optimizer steps and
batch (train.batch_size x gradient_accumulation_steps rows of up to data.max_seq_length tokens: the
seed pads each conversation to that length, TRL and peftkit fill rows as the config's data.packing
says), each in its own process, one after another, so start-up and peak memory are its own. The
recipe modules (peftkit.bench.recipes) time the loop and count the tokens fed the same way; this
module prepares the shared rows, measures the machine's matmul peak, runs them and writes the table.

MFU = 4 x N x useful tokens/s / matmul peak, N the base model's parameters: a LoRA step does the
2N forward FLOPs per token and 2N for the activation gradients (frozen weights need no weight
gradients), and the peak is a torch.matmul probe in the dtype the recipe trains in, on this machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from peftkit import atomic
from peftkit.config import RunConfig, load_config, save_config
from peftkit.errors import PeftkitError
from peftkit.presets import DEMO

# The name users type -> the module run as `python -m MODULE --spec FILE --out FILE`.
RECIPES = {"seed": "peftkit.bench.recipes.seed", "trl": "peftkit.bench.recipes.trl_sft",
           "peftkit": "peftkit.bench.recipes.peftkit_run"}
BUNDLED_CONFIG = DEMO
MFU_FORMULA = "MFU = 4 x N x useful tokens/s / matmul peak (N: base parameters; LoRA: 2N forward + 2N activation-gradient FLOPs)"
COLUMNS = (("tokens_per_second", "tokens/s", ".1f"), ("seconds_per_step", "s/step", ".2f"), ("startup_seconds", "start-up s", ".1f"),
           ("total_seconds", "total s", ".1f"), ("peak_rss_mib", "peak RSS MiB", ",.0f"), ("mfu", "MFU", ".2%"),
           ("eval_loss", "eval loss", ".3f"))


class BenchError(PeftkitError):
    """The benchmark cannot start: an unknown recipe, data it cannot compare on, a config it does not fit."""


@dataclass
class BenchResult:
    report: dict
    json_file: Path
    markdown_file: Path


def bench_train(config_path: str | Path | None, *, recipes: list[str], steps: int = 10, data: str | None = None,
                eval_data: str | None = None, out_dir: str | Path = "runs/bench-train", overrides: list[str] | None = None,
                command: str | None = None) -> BenchResult:
    """Return the measured comparison of the recipes; writes OUT/train_bench.json and OUT/train_bench.md."""
    from peftkit.models import resolve_model

    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes:
        raise BenchError(f"--recipes {','.join(recipes)}: {', '.join(map(repr, unknown)) or 'nothing'} is not a recipe; "
                         f"choose from {', '.join(RECIPES)}")
    if steps < 1:
        raise BenchError(f"--steps {steps} must be at least 1")
    overrides = list(overrides or [])
    if data:
        overrides.append(f"data.path={data}")
    if eval_data:
        overrides.append(f"data.eval_path={eval_data}")
    if config_path is None and BUNDLED_CONFIG.is_file():
        config_path = BUNDLED_CONFIG
    cfg = load_config(config_path, overrides)
    targets = lora_targets(cfg)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_file, eval_file, data_info = write_rows(cfg, out)
    model_dir = resolve_model(cfg.model.name, cfg.model.revision)  # a one-time conversion happens here, untimed
    specs = {name: recipe_spec(cfg, name, steps=steps, model_dir=model_dir, train_file=train_file, eval_file=eval_file,
                               targets=targets, out=out) for name in recipes}
    peaks = {dtype: matmul_peak(dtype) for dtype in sorted({s["dtype"] for s in specs.values()})}
    results = [run_recipe(name, specs[name], out) for name in recipes]
    for r in results:
        if r["status"] == "ok":
            r["matmul_peak_flops"] = peaks[r["dtype"]]
            r["mfu"] = 4 * r["parameters"] * r["tokens_per_second"] / peaks[r["dtype"]]
    report = {"command": command, "machine": machine(), "mfu_formula": MFU_FORMULA, "matmul_peak_flops": peaks,
              "model": cfg.model.name, "steps": steps, "data": data_info,
              "batch": {"batch_size": cfg.train.batch_size, "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
                        "max_seq_length": cfg.data.max_seq_length, "packing": cfg.data.packing},
              "lora": specs[recipes[0]]["lora"], "recipes": results, "ratios": ratios(results)}
    json_file, md_file = out / "train_bench.json", out / "train_bench.md"
    atomic.write_json(json_file, report)
    atomic.write_text(md_file, markdown(report))
    return BenchResult(report, json_file, md_file)


def lora_targets(cfg: RunConfig) -> list[str]:
    """Return the LoRA target modules every recipe uses, refusing configs the recipes cannot all train."""
    from peftkit.methods.lora import target_modules

    m = cfg.method
    if m.name != "lora" or m.use_dora or m.init_from:
        raise BenchError(f"method.name={m.name!r}{' with use_dora' * m.use_dora}{' with init_from' * bool(m.init_from)}: "
                         "bench train compares plain LoRA recipes; use --set method.name=lora")
    if cfg.data.chat_template:
        raise BenchError("data.chat_template is set, but the seed and TRL recipes render with the tokenizer's own "
                         "template; unset it (--set data.chat_template=null) to compare like with like")
    return target_modules(m.target_modules)


def write_rows(cfg: RunConfig, out: Path) -> tuple[Path, Path, dict]:
    """Write the training and held-out conversations every recipe reads; return both files and where they came from."""
    from peftkit.data.prepare import held_out_examples, read_examples

    d = cfg.data
    if d.sources or not d.path:
        raise BenchError("bench train reads one training file: pass --data FILE or set data.path (not data.sources)")
    train = read_examples(d.path, d.format, dict(d.columns))[0]
    if d.eval_path:
        held, source = read_examples(d.eval_path, d.format, dict(d.columns))[0], d.eval_path
    elif d.eval_fraction > 0:
        held = held_out_examples(d, cfg.train.seed)  # the rows `peftkit train` would hold out with this seed
        taken = {e.where for e in held}
        train, source = [e for e in train if e.where not in taken], f"{d.path} (held-out {d.eval_fraction:g})"
    else:
        raise BenchError("no held-out rows to score: pass --eval-data FILE, or set data.eval_path or data.eval_fraction")
    for e in train + held:
        if not e.messages:
            raise BenchError(f"{e.where}: bench train compares chat recipes, so every row needs 'messages' "
                             "(a list of {role, content})")
    files = []
    for name, rows in (("train_rows.jsonl", train), ("eval_rows.jsonl", held)):
        atomic.write_text(out / name, "".join(json.dumps({"messages": e.messages}) + "\n" for e in rows))
        files.append(out / name)
    return files[0], files[1], {"train": d.path, "train_rows": len(train), "eval": source, "eval_rows": len(held)}


def recipe_spec(cfg: RunConfig, name: str, *, steps: int, model_dir: Path, train_file: Path, eval_file: Path,
                targets: list[str], out: Path) -> dict:
    """Return the JSON spec one recipe process reads (and for peftkit, write the config it trains with)."""
    t, d, m = cfg.train, cfg.data, cfg.method
    spec = {"recipe": name, "model_dir": str(model_dir), "train_file": str(train_file), "eval_file": str(eval_file),
            "system_prompt": d.system_prompt, "max_seq_length": d.max_seq_length, "packing": d.packing,
            "lora": {"rank": m.rank, "alpha": m.alpha, "dropout": m.dropout, "target_modules": targets},
            "steps": steps, "batch_size": t.batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "learning_rate": t.learning_rate, "lr_scheduler": t.lr_scheduler, "warmup_ratio": t.warmup_ratio,
            "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm, "optimizer": t.optimizer,
            "gradient_checkpointing": t.gradient_checkpointing, "logging_steps": t.logging_steps, "seed": t.seed,
            "dtype": recipe_dtype(name, cfg.model.dtype), "output_dir": str(out / name)}
    if name == "peftkit":
        spec["config_file"] = str(out / "peftkit.yaml")
        save_config(peftkit_config(cfg, steps=steps, train_file=train_file, out=out), spec["config_file"])
    return spec


def peftkit_config(cfg: RunConfig, *, steps: int, train_file: Path, out: Path) -> RunConfig:
    """Return the user's config with the bench's overrides: steps, the shared rows, no eval split, fresh cache, no registry."""
    import copy
    import shutil

    own = copy.deepcopy(cfg)
    own.train.max_steps, own.train.output_dir = steps, str(out / "peftkit")
    own.data.path, own.data.eval_path, own.data.eval_fraction = str(train_file), None, 0.0
    own.data.cache_dir = str(out / "peftkit-data-cache")
    shutil.rmtree(own.data.cache_dir, ignore_errors=True)  # a cache hit would hide data preparation from start-up
    own.registry.register, own.eval.generate = False, False
    return own


def recipe_dtype(name: str, model_dtype: str) -> str:
    """Return the dtype a recipe trains in: fp32 for the seed, bf16-if-fast for TRL, the config's for peftkit."""
    import torch

    from peftkit.models import resolve_dtype

    if name == "seed":
        return "fp32"
    dtype = resolve_dtype("auto" if name == "trl" else model_dtype)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def matmul_peak(dtype: str, seconds: float = 1.0) -> float:
    """Return the FLOP/s of repeated square torch.matmul in dtype on this machine (2048, or 512 where it is slow)."""
    import torch

    kind = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 2048
    small = torch.randn(512, 512, device=device).to(kind)
    started = time.perf_counter()
    torch.matmul(small, small)
    if time.perf_counter() - started > 0.05:  # emulated bf16 runs ~50x slower; keep the probe to about a second
        size = 512
    a = torch.randn(size, size, device=device).to(kind)
    torch.matmul(a, a)  # warm-up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.matmul(a, a)
        runs += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * runs / (time.perf_counter() - started)


def run_recipe(name: str, spec: dict, out: Path) -> dict:
    """Run one recipe in a fresh process; return its result with total wall time and peak RSS, or why it failed."""
    spec_file, result_file, log_file = out / f"{name}.spec.json", out / f"{name}.json", out / f"{name}.log"
    atomic.write_json(spec_file, spec)
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", RECIPES[name], "--spec", str(spec_file), "--out", str(result_file)]
    print(f"== {name} ({spec['dtype']}): log in {log_file}", flush=True)
    started = time.perf_counter()
    with open(log_file, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the maximum over all children
        proc.returncode = os.waitstatus_to_exitcode(status)
    total = time.perf_counter() - started
    if proc.returncode != 0 or not result_file.is_file():
        tail = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        result = {"recipe": name, "status": f"failed: exit {proc.returncode}: " + " / ".join(tail) + f" (log: {log_file})"}
    else:
        result = json.loads(result_file.read_text(encoding="utf-8"))
    result.update(total_seconds=total, peak_rss_mib=usage.ru_maxrss / 1024, log=str(log_file))  # ru_maxrss is KiB on Linux
    print(f"   {result['status'][:300]}", flush=True)
    return result


def ratios(results: list[dict]) -> dict[str, dict[str, float]]:
    """Return peftkit's figures divided by the seed's and TRL's (for those that ran)."""
    ok = {r["recipe"]: r for r in results if r["status"] == "ok"}
    out = {}
    for other in ("seed", "trl"):
        if "peftkit" in ok and other in ok:
            out[f"peftkit/{other}"] = {key: ok["peftkit"][key] / ok[other][key] for key, _, _ in COLUMNS
                                       if ok["peftkit"].get(key) is not None and ok[other].get(key)}
    return out


def machine() -> dict:
    """Return the CPU (or GPU), cores, torch threads and torch version of this machine."""
    import torch

    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__}


def table(report: dict) -> str:
    """Return the markdown table: one row per recipe, then peftkit's ratios to the others."""
    rows = ["| recipe | dtype | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
            "|---|---|" + "--:|" * len(COLUMNS)]
    for r in report["recipes"]:
        if r["status"] != "ok":
            rows.append(f"| {r['recipe']} | {r['status'].replace('|', '/')} |" + " |" * len(COLUMNS))
            continue
        cells = [format(r[key], fmt) if r.get(key) is not None else "n/a" for key, _, fmt in COLUMNS]
        rows.append(f"| {r['recipe']} | {r['dtype']} | " + " | ".join(cells) + " |")
    for pair, values in report["ratios"].items():
        cells = [f"{values[key]:.2f}x" if key in values else "n/a" for key, _, _ in COLUMNS]
        rows.append(f"| {pair} | | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def markdown(report: dict) -> str:
    """Return train_bench.md: command, machine, budget, formula and the table."""
    m, b = report["machine"], report["batch"]
    peaks = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in report["matmul_peak_flops"].items())
    lines = ["Command:", "", "```", report["command"] or "(called from Python)", "```", "",
             f"Machine: {m['gpu'] or m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}; "
             f"matmul peak {peaks}.",
             f"Budget: {report['model']}, {report['steps']} optimizer steps of {b['batch_size']} x "
             f"{b['gradient_accumulation_steps']} rows of up to {b['max_seq_length']} tokens (packing "
             f"{'on' if b['packing'] else 'off'}); {report['data']['train_rows']} training rows; eval loss on "
             f"{report['data']['eval_rows']} held-out rows ({report['data']['eval']}).",
             f"{MFU_FORMULA}.", "", table(report), ""]
    return "\n".join(lines)
