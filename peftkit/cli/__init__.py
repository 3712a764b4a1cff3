"""`peftkit` command line: each group module adds its subcommands; each command calls one library function.

Group modules import torch-heavy code inside their handlers only, so `peftkit --help`
and registry look-ups stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from peftkit import __version__
from peftkit.errors import PeftkitError

# One module per command group; each defines register(subparsers).
GROUPS = (
    "peftkit.cli.train_cmds",
    "peftkit.cli.data_cmds",
    "peftkit.cli.registry_cmds",
    "peftkit.cli.push_cmds",
    "peftkit.cli.serve_cmds",
    "peftkit.cli.dashboard_cmds",
    "peftkit.cli.compare_cmds",
    "peftkit.cli.eval_cmds",
    "peftkit.cli.merge_cmds",
    "peftkit.cli.bench_cmds",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every command group registered."""
    parser = argparse.ArgumentParser(prog="peftkit", description="Fine-tune, keep and serve adapters for Llama models.")
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in GROUPS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as typed, for commands that record it (compare)
    try:
        return int(args.func(args) or 0)
    except PeftkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
