"""Commands that look at training data: `peftkit data inspect CONFIG`."""
from __future__ import annotations

import logging
import sys


def register(sub) -> None:
    """Add the `data` command group to the CLI."""
    group = sub.add_parser("data", help="look at training data exactly as training will see it")
    data_sub = group.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = data_sub.add_parser("inspect", help="rows, tokens, lengths, truncation and the first examples with trained tokens marked")
    p.add_argument("config", help="YAML config, e.g. configs/smollm2-135m/lora.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.max_seq_length=512 (repeatable)")
    p.add_argument("-n", "--examples", type=int, default=3, help="how many training examples to print (default 3)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="mark trained tokens in green (auto: when printing to a terminal) or between [[ ]]")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from peftkit.config import load_config
    from peftkit.data import prepare
    from peftkit.data.report import build_report
    from peftkit.models import load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model.name, revision=cfg.model.revision, offline=cfg.model.offline)
    prepared = prepare(cfg.data, tokenizer, seed=cfg.train.seed)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(build_report(prepared, tokenizer, n=args.examples, color=color))
    return 0
