"""Benchmark commands: `peftkit bench train` (the seed recipe, TRL and peftkit on one budget)."""
from __future__ import annotations

import shlex


def register(sub) -> None:
    """Add the bench command group to the CLI."""
    bench = sub.add_parser("bench", help="reproducible benchmarks", description="Reproducible benchmarks.")
    group = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = group.add_parser(
        "train", help="train the seed recipe, TRL's SFTTrainer and peftkit on one budget; compare speed and loss",
        description="Each recipe trains the same model, rows, LoRA settings, steps and batch in its own process, "
                    "one after another; prints a table and writes train_bench.json and train_bench.md to --out.")
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config every recipe takes its model, data and budget from "
                        "(default configs/demo/fernhill.yaml: the demo on the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps for every recipe (default 10)")
    p.add_argument("--data", help="training conversations (JSONL of messages); default the config's data.path")
    p.add_argument("--eval-data", help="held-out conversations scored after training; default data.eval_path, "
                                       "else the rows data.eval_fraction holds out")
    p.add_argument("--recipes", default="seed,trl,peftkit", help="comma-separated recipes (default seed,trl,peftkit)")
    p.add_argument("--out", default="runs/bench-train", help="folder for logs and results (default runs/bench-train)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every recipe, e.g. --set train.batch_size=4 (repeatable)")
    p.set_defaults(func=cmd_bench_train)


def cmd_bench_train(args) -> int:
    from peftkit.bench.train_bench import bench_train, table

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    command = "peftkit " + " ".join(shlex.quote(a) for a in args.argv)
    result = bench_train(args.config, recipes=recipes, steps=args.steps, data=args.data, eval_data=args.eval_data,
                         out_dir=args.out, overrides=args.overrides, command=command)
    print(table(result.report))
    print(f"\nresults: {result.json_file}\ntable: {result.markdown_file}")
    return 1 if any(r["status"].startswith("failed") for r in result.report["recipes"]) else 0
