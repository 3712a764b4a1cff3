"""`peftkit push REF --repo ORG/NAME`: upload a registered adapter and its model card to the Hugging Face Hub."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the push command to the CLI."""
    p = sub.add_parser("push", help="upload a registered adapter and its model card to a Hugging Face Hub repo (private by default)",
                       description="Uploads the adapter's files (adapter_config.json, adapter_model.safetensors, peftkit.json, ...) "
                                   "and a README.md model card with its base model, metrics, data fingerprint and lineage. "
                                   "The registry is only read.")
    p.add_argument("ref", metavar="REF", help="registry reference: NAME (latest), NAME@3 or NAME:TAG")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="hub model repo to push to; created when missing")
    p.add_argument("--public", action="store_true",
                   help="create the repo public; by default it is private, and an existing public repo is refused")
    p.add_argument("--token", help="token with write access (default: HF_TOKEN, or the one saved by `hf auth login`; "
                                   "prefer those, a token typed here stays in the shell history)")
    p.add_argument("--revision", metavar="BRANCH", help="branch to push to, created when missing (default main)")
    p.add_argument("--commit-message", metavar="TEXT", help="commit message (default: peftkit push NAME@VERSION)")
    p.add_argument("--registry", metavar="DIR", help="registry folder (default: $PEFTKIT_HOME/registry, i.e. ~/.peftkit/registry)")
    p.set_defaults(func=cmd_push)


def cmd_push(args) -> int:
    from peftkit.hub import push_adapter
    from peftkit.registry import Registry

    with Registry(args.registry) as reg:
        result = push_adapter(reg, args.ref, args.repo, private=not args.public, token=args.token,
                              revision=args.revision, commit_message=args.commit_message)
    where = f"{result.url}" + (f" (branch {result.revision})" if result.revision else "")
    print(f"pushed {result.ref} to {where}, {'private' if result.private else 'public'}: {', '.join(result.files)}")
    return 0
