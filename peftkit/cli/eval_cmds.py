"""`peftkit eval REF_OR_DIR`: the adapter against its base on held-out data, with a forgetting check."""
from __future__ import annotations


def register(sub) -> None:
    """Add the eval command to the CLI."""
    p = sub.add_parser("eval", help="compare an adapter with its base on held-out data (loss, accuracy, answers, forgetting)",
                       description="Teacher-forced loss, perplexity and token accuracy on the answer tokens, greedy "
                                   "answers scored by exact match, ROUGE-L and chrF, and the loss on general English "
                                   "text, for the base and the adapter side by side.")
    p.add_argument("adapter", nargs="?", help="registry reference (name, name@3, name:tag) or adapter/run folder; "
                                              "omit with --base-only to evaluate a base model alone")
    p.add_argument("--data", help="held-out data in any format training accepts (default: the run's eval file or split)")
    p.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--base-only", action="store_true", help="evaluate the base model only")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest generated answer (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward (default 8)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--examples", type=int, default=3, help="example answers to show (default 3)")
    p.add_argument("--no-generate", action="store_true", help="skip generation (loss and accuracy only)")
    p.add_argument("--no-forgetting", action="store_true", help="skip the general-text forgetting check")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--registry", help="registry folder (default: $PEFTKIT_HOME/registry)")
    p.add_argument("--out", help="JSON file for the results (default: eval-NAME.json here, lm-eval-NAME.json "
                                 "with --lm-eval)")
    p.add_argument("--lm-eval", metavar="TASKS",
                   help="run lm-evaluation-harness tasks (comma-separated, e.g. hellaswag,arc_easy) on the base and "
                        "the adapter instead of the held-out evaluation (needs: pip install \"peftkit[lm-eval]\")")
    p.add_argument("--lm-eval-include", metavar="FOLDER", help="a folder of your own lm_eval task YAMLs for --lm-eval")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from peftkit.errors import PeftkitError
    from peftkit.eval_report import format_report
    from peftkit.evaluate import EvalSettings, run_eval

    if not args.adapter and not (args.base_only and args.base):
        raise PeftkitError("name an adapter (registry reference or folder), or pass --base-only --base MODEL")
    for flag in ("max_new_tokens", "batch_size", "limit", "examples"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "examples" else 1):
            raise PeftkitError(f"--{flag.replace('_', '-')}={value} must be at least {0 if flag == 'examples' else 1}")
    if args.lm_eval_include and not args.lm_eval:
        raise PeftkitError("--lm-eval-include names task YAMLs for --lm-eval; pass --lm-eval TASKS too")
    if args.lm_eval:
        return cmd_lm_eval(args)
    settings = EvalSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                            examples=args.examples, generate=not args.no_generate, forgetting=not args.no_forgetting)
    report, path = run_eval(args.adapter, data=args.data, base=args.base, base_only=args.base_only, settings=settings,
                            registry=args.registry, dtype=args.dtype, out=args.out)
    print(format_report(report.to_dict()))
    print(f"results: {path}")
    return 0


def cmd_lm_eval(args) -> int:
    from peftkit.errors import PeftkitError
    from peftkit.lm_harness import HarnessSettings, format_table, parse_tasks, run_harness

    if args.data:
        raise PeftkitError("--data does not apply to --lm-eval: the tasks bring their own data")
    settings = HarnessSettings(tasks=parse_tasks(args.lm_eval), include=args.lm_eval_include, limit=args.limit,
                               batch_size=args.batch_size)
    report, path = run_harness(args.adapter, settings, base=args.base, base_only=args.base_only,
                               registry=args.registry, dtype=args.dtype, out=args.out)
    print(format_table(report))
    print(f"results: {path}")
    return 0
