"""`peftkit compare CONFIG --methods lora,qlora,...`: train each method on the same budget and tabulate them."""
from __future__ import annotations

import shlex


def register(sub) -> None:
    """Add the compare command to the CLI."""
    from peftkit.compare import DEFAULT_METHODS, METHOD_LR

    p = sub.add_parser("compare", help="train several methods on the same data and budget; write a table and a chart",
                       description="Each method trains in its own process (so peak memory is its own); "
                                   "prints exact Llama 3.1 8B figures for each method's preset as well.")
    p.add_argument("config", help="YAML config every method starts from, e.g. configs/smollm2-135m/lora.yaml")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every method, e.g. --set train.max_steps=30 (repeatable)")
    p.add_argument("--lr", dest="learning_rates", action="append", default=[], metavar="METHOD=LR",
                   help="learning rate for one method (repeatable); defaults: "
                        + ", ".join(f"{k} {v:g}" for k, v in METHOD_LR.items()) + ", the config's for the LoRA family; all the config's when it sets train.learning_rate=auto; "
                        "METHOD=auto: a range test picks it")
    p.add_argument("--out", default="runs/compare", help="folder for the runs, methods.md and methods.png (default runs/compare)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from peftkit.compare import compare, footprint_table, measured_table
    from peftkit.methods import MethodError

    rates = {}
    for item in args.learning_rates:
        method, sep, value = item.partition("=")
        try:
            rates[method.strip()] = "auto" if value.strip() == "auto" else float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise MethodError(f"--lr {item!r} must look like METHOD=LR, e.g. --lr full=2e-5 or --lr full=auto")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    command = "peftkit " + " ".join(shlex.quote(a) for a in args.argv)
    result = compare(args.config, methods, overrides=args.overrides, out_dir=args.out, learning_rates=rates, command=command)
    print(measured_table(result.runs))
    print("\nLlama 3.1 8B, exact (meta device, no download):")
    print(footprint_table(result.footprints))
    print(f"\ntable: {result.table}\nchart: {result.chart}")
    return 1 if any(r.error for r in result.runs) else 0

