"""Which preset defaults learn the most per second, measured across several data sets rather than one.

    python -m peftkit.bench.tune_presets --out runs/tune [--sets shop,pydoc,...] [--variants lora-auto,...]

Every variant starts from a generic preset of the bundled SmolLM2-135M (configs/smollm2-135m/<method>.yaml),
changes one thing (the rate, the rank, the target modules, the epochs, the batch size), and trains on
each data set in its own `peftkit train` process, one after another, same seed and rows, nothing
registered. The data sets: the shop conversations (its first SHOP_ROWS rows, so every set is about the
same size) and the standard-library sets of peftkit.bench.tuning_data. A finished run is skipped when
the script is started again, so it can be stopped and continued. Writes OUT/results.json and OUT/table.md:
eval loss per set, its mean, the mean rank among variants of the same method, and wall seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from peftkit import atomic
from peftkit.compare import MethodRun, run_method
from peftkit.config import load_config, save_config
from peftkit.hardware import cpu_name
from peftkit.presets import pick_preset

SHOP_ROWS = 160
BUDGET = ["train.epochs=1", "train.save_steps=1000", "train.logging_steps=5", "train.report_to=[none]", "data.eval_fraction=0"]
"""Settings every run shares: one epoch (the epochs variant trains two), no mid-run checkpoints or trackers."""

VARIANTS: dict[str, tuple[str, list[str]]] = {
    # LoRA (and DoRA and QLoRA, which share its preset): the rate, then one setting at a time at the auto rate.
    "lora-auto": ("lora", ["train.learning_rate=auto"]),
    "lora-1e-3": ("lora", ["train.learning_rate=1e-3"]),
    "lora-1e-2": ("lora", ["train.learning_rate=1e-2"]),
    "lora-auto-rank32": ("lora", ["train.learning_rate=auto", "method.rank=32", "method.alpha=64"]),
    "lora-auto-all-linear": ("lora", ["train.learning_rate=auto", "method.target_modules=all-linear"]),
    "lora-auto-2-epochs": ("lora", ["train.learning_rate=auto", "train.epochs=2"]),
    "lora-auto-batch4": ("lora", ["train.learning_rate=auto", "train.batch_size=4"]),
    # The other methods: the automatic rate against the preset's fixed one.
    **{f"{m}-auto": (m, ["train.learning_rate=auto"]) for m in ("prefix", "prompt", "ia3", "bottleneck", "full")},
    "prefix-3e-2": ("prefix", ["train.learning_rate=3e-2"]),
    "prompt-3e-2": ("prompt", ["train.learning_rate=3e-2"]),
    "ia3-3e-2": ("ia3", ["train.learning_rate=3e-2"]),
    "bottleneck-1e-2": ("bottleneck", ["train.learning_rate=1e-2"]),
    "full-2e-4": ("full", ["train.learning_rate=2e-4"]),
}


def data_sets(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Return {name: (train file, eval file)}: the shop's first SHOP_ROWS rows, and the tuning_data sets built into folder."""
    from peftkit.bench.tuning_data import build, data_set_files

    build(folder)
    sets = data_set_files(folder)
    shop_train, shop_eval = sets["shop"]
    head = folder / "shop" / "train.jsonl"
    head.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(head, "".join(Path(shop_train).read_text(encoding="utf-8").splitlines(keepends=True)[:SHOP_ROWS]))
    sets["shop"] = (head, Path(shop_eval))
    return {name: (Path(t), Path(e)) for name, (t, e) in sets.items()}


def run_one(variant: str, data: str, files: tuple[Path, Path], out: Path) -> None:
    """Train one variant on one data set, unless it finished before (its results are read by `finished`)."""
    method, overrides = VARIANTS[variant]
    run_dir = out / variant / data
    if (run_dir / "metrics.json").is_file():
        return
    preset, extra = pick_preset(None, method)
    cfg = load_config(preset, extra + BUDGET + overrides + [
        f"data.path={files[0]}", f"data.eval_path={files[1]}", f"train.output_dir={run_dir}", f"name={variant}-{data}"])
    frozen = out / variant / f"{data}.yaml"
    frozen.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, frozen)
    run_method(frozen, MethodRun(method, variant, cfg.train.learning_rate, run_dir), log_file=out / variant / f"{data}.log")


def finished(out: Path, sets: list[str]) -> dict[str, dict[str, dict | None]]:
    """Return {variant: {set: metrics or None}} for every variant with at least one finished run under out."""
    results = {}
    for variant in VARIANTS:
        found = {data: json.loads(f.read_text()) if (f := out / variant / data / "metrics.json").is_file() else None
                 for data in sets}
        if any(found.values()):
            results[variant] = found
    return results


def summarize(results: dict[str, dict[str, dict | None]], sets: list[str]) -> str:
    """Return the markdown table: eval loss per set and its mean, the mean rank within the method, seconds, rates."""
    ranks: dict[str, list[int]] = {}
    for data in sets:
        for method in {m for m, _ in VARIANTS.values()}:
            scored = sorted((r[data]["eval_loss"], v) for v, r in results.items()
                            if VARIANTS[v][0] == method and r.get(data) and r[data].get("eval_loss") is not None)
            for place, (_, v) in enumerate(scored, 1):
                ranks.setdefault(v, []).append(place)
    head = (f"| variant | {' | '.join(f'{s} eval loss' for s in sets)} | mean eval loss | mean rank in method "
            f"| mean wall s | rates chosen |\n|---|{'--:|' * len(sets)}--:|--:|--:|---|")
    rows = [head]
    for variant, per_set in results.items():
        losses = [per_set[s]["eval_loss"] if per_set.get(s) else None for s in sets]
        done = [x for x in losses if x is not None]
        walls = [per_set[s]["wall_time_s"] + (per_set[s].get("learning_rate_search") or {}).get("seconds", 0)
                 for s in sets if per_set.get(s)]
        chosen = [f"{per_set[s]['learning_rate']:.2g}" for s in sets if per_set.get(s) and per_set[s].get("learning_rate_search")]
        cells = " | ".join("failed" if x is None else f"{x:.3f}" for x in losses)
        mean = f"{sum(done) / len(done):.3f}" if len(done) == len(sets) else "incomplete"
        rank = f"{sum(ranks.get(variant, [])) / len(ranks[variant]):.2f}" if ranks.get(variant) else "n/a"
        wall = f"{sum(walls) / len(walls):.0f}" if walls else "n/a"
        rows.append(f"| {variant} | {cells} | {mean} | {rank} | {wall} | {', '.join(chosen) or 'fixed'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftkit.bench.tune_presets", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/tune"))
    p.add_argument("--sets", default=None, help="comma-separated data sets (default: all)")
    p.add_argument("--variants", default=None, help=f"comma-separated variants (default: all: {', '.join(VARIANTS)})")
    args = p.parse_args(argv)
    all_data = data_sets(args.out / "data")
    sets = args.sets.split(",") if args.sets else list(all_data)
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    for variant in variants:
        for data in sets:
            run_one(variant, data, all_data[data], args.out)
    results = finished(args.out, sets)  # this call's runs and every earlier call's
    atomic.write_json(args.out / "results.json", results)
    table = summarize(results, sets)
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
               f"Python {platform.python_version()} (the standard-library sets change with the patch version)")
    atomic.write_text(args.out / "table.md", f"{table}\n\nMachine: {machine}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
