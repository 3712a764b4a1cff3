"""The `serve` command: the base model and the registry's adapters behind an OpenAI-compatible HTTP API.

Its options are the fields of peftkit.serving.settings.ServeSettings, help text included; only the
vLLM launch's own options are written here.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import typing

from peftkit.serving.settings import ServeSettings


def register(sub) -> None:
    """Add the serve command to the CLI."""
    p = sub.add_parser("serve", help="serve the base model and the registry's adapters (OpenAI-compatible HTTP)",
                       description="Serve one base model with many adapters over an OpenAI-compatible API. "
                                   "Clients pick an adapter with `model`: name, name@3, name:tag, or the base's name.")
    add_settings_options(p)
    p.add_argument("--engine", choices=["native", "vllm"], default="native",
                   help="native: serve here; vllm: print the vLLM launch for the registry's LoRA adapters")
    p.add_argument("--max-lora-rank", type=int, help="vllm: max LoRA rank (default: the smallest allowed that fits)")
    p.add_argument("--all-versions", action="store_true", help="vllm: also serve versions neither latest nor tagged")
    p.add_argument("--exec", dest="run_vllm", action="store_true", help="vllm: run the launch instead of printing it")
    p.set_defaults(func=cmd_serve)


def add_settings_options(parser) -> None:
    """Add one option per ServeSettings field, its docstring the help: --max-batch-size N, and --no-mix for mix=True."""
    from peftkit.config import field_docs

    docs, types = field_docs(ServeSettings), typing.get_type_hints(ServeSettings)
    for f in dataclasses.fields(ServeSettings):
        flag, doc = "--" + f.name.replace("_", "-"), docs[f.name]
        if types[f.name] is bool:
            if f.default:
                parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=doc)
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=doc)
            continue
        default, env = f.default, f.metadata.get("env")
        if env:
            default, doc = os.environ.get(env, default), f"{doc.rstrip('.')} (default: ${env})"
        elif default is not None:
            doc = f"{doc.rstrip('.')} (default: {default})"
        kind = next(t for t in typing.get_args(types[f.name]) or (types[f.name],) if t is not type(None))
        parser.add_argument(flag, dest=f.name, default=default, type=kind if kind is not str else None,
                            choices=f.metadata.get("choices"), help=doc)


def settings_from(args) -> ServeSettings:
    """Return the ServeSettings the parsed options name."""
    return ServeSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)})


def cmd_serve(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from(args)
    if args.engine == "vllm":
        return _vllm(args, settings)
    from peftkit.serving.server import serve

    serve(settings)
    return 0


def _vllm(args, settings: ServeSettings) -> int:
    from peftkit.serving.server import check_exposure
    from peftkit.serving.vllm import plan_for_registry

    check_exposure(settings.host, settings.api_key, settings.insecure_no_auth)
    plan = plan_for_registry(settings.base, settings.registry, served_name=settings.served_name, host=settings.host,
                             port=settings.port, max_loras=settings.max_loaded_adapters, max_lora_rank=args.max_lora_rank,
                             all_versions=args.all_versions, dtype=settings.dtype)
    for ref, why in plan.rejected:
        print(f"not served by vLLM: {ref}: {why}", file=sys.stderr)
    if not args.run_vllm:
        if settings.api_key:
            print("# vLLM reads its key from the environment: export VLLM_API_KEY=<your key> first", file=sys.stderr)
        print(plan.command())
        return 0
    env = dict(os.environ)
    if settings.api_key:
        env["VLLM_API_KEY"] = settings.api_key
    try:
        os.execvpe(plan.argv[0], plan.argv, env)
    except FileNotFoundError:
        print("error: vllm is not installed here (pip install vllm, on a machine with a GPU)", file=sys.stderr)
        return 2
