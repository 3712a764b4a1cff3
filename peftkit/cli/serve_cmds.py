"""The `serve` command: the base model and the registry's adapters behind an OpenAI-compatible HTTP API."""
from __future__ import annotations

import logging
import os
import sys

DEFAULT_BASE = "smollm2-135m-instruct"


def register(sub) -> None:
    """Add the serve command to the CLI."""
    p = sub.add_parser("serve", help="serve the base model and the registry's adapters (OpenAI-compatible HTTP)",
                       description="Serve one base model with many adapters over an OpenAI-compatible API. "
                                   "Clients pick an adapter with `model`: name, name@3, name:tag, or the base's name.")
    p.add_argument("--base", default=DEFAULT_BASE, help=f"base model: alias, local folder or hub id (default: {DEFAULT_BASE})")
    p.add_argument("--registry", help="registry folder (default: $PEFTKIT_HOME/registry)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("PEFTKIT_API_KEY"),
                   help="bearer key required on every route but /health (default: $PEFTKIT_API_KEY)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow listening beyond loopback without an API key")
    p.add_argument("--max-loaded-adapters", type=int, default=8, help="adapters kept loaded at once (LRU; default 8)")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests generated together per step (default 16)")
    p.add_argument("--max-concurrent", type=int, default=64,
                   help="requests admitted at once, running or queued; more get 429 (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--served-name", help="name clients use for the base model (default: the --base value or folder name)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; fewer helps on a shared CPU)")
    p.add_argument("--no-mix", action="store_true",
                   help="run each adapter in its own batch instead of mixing LoRA, prefix and prompt adapters in one batch")
    p.add_argument("--engine", choices=["native", "vllm"], default="native",
                   help="native: serve here; vllm: print the vLLM launch for the registry's LoRA adapters")
    p.add_argument("--max-lora-rank", type=int, help="vllm: max LoRA rank (default: the smallest allowed that fits)")
    p.add_argument("--all-versions", action="store_true", help="vllm: also serve versions neither latest nor tagged")
    p.add_argument("--exec", dest="run_vllm", action="store_true", help="vllm: run the launch instead of printing it")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.engine == "vllm":
        return _vllm(args)
    from peftkit.serving.server import serve

    serve(args.base, registry=args.registry, host=args.host, port=args.port, api_key=args.api_key,
          allow_no_auth=args.insecure_no_auth, dtype=args.dtype, served_name=args.served_name,
          max_loaded_adapters=args.max_loaded_adapters, max_batch_size=args.max_batch_size,
          mix_adapters=not args.no_mix, max_concurrent=args.max_concurrent, max_body_bytes=args.max_body_bytes,
          threads=args.threads)
    return 0


def _vllm(args) -> int:
    from peftkit.serving.server import check_exposure
    from peftkit.serving.vllm import plan_for_registry

    check_exposure(args.host, args.api_key, args.insecure_no_auth)
    plan = plan_for_registry(args.base, args.registry, served_name=args.served_name, host=args.host, port=args.port,
                             max_loras=args.max_loaded_adapters, max_lora_rank=args.max_lora_rank,
                             all_versions=args.all_versions, dtype=args.dtype)
    for ref, why in plan.rejected:
        print(f"not served by vLLM: {ref}: {why}", file=sys.stderr)
    if not args.run_vllm:
        if args.api_key:
            print("# vLLM reads its key from the environment: export VLLM_API_KEY=<your key> first", file=sys.stderr)
        print(plan.command())
        return 0
    env = dict(os.environ)
    if args.api_key:
        env["VLLM_API_KEY"] = args.api_key
    try:
        os.execvpe(plan.argv[0], plan.argv, env)
    except FileNotFoundError:
        print("error: vllm is not installed here (pip install vllm, on a machine with a GPU)", file=sys.stderr)
        return 2
