"""`peftkit registry ...`: add, list, show, tag, untag, remove, verify, export, import, gc, checkout.

Each handler opens the registry and calls one Registry method; nothing here imports torch.
"""
from __future__ import annotations

import argparse
import json
import sys

HOME_HELP = "registry folder (default: $PEFTKIT_HOME/registry, i.e. ~/.peftkit/registry)"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `registry` command group and its actions to the top-level parser."""
    group = subparsers.add_parser("registry", help="catalog of adapters: versions, tags, lineage, integrity",
                                  description="Find, inspect and keep adapters. References: NAME (latest), NAME@3, NAME:TAG.")
    sub = group.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="DIR", help=HOME_HELP)
    common.add_argument("--allow-network-fs", action="store_true",
                        help="use a registry on NFS/SMB/sshfs/9p anyway (SQLite's WAL can corrupt it there if several "
                             "machines use it; same as PEFTKIT_REGISTRY_ALLOW_NETWORK_FS=1)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of text")
    # In this order in `peftkit registry --help`.
    _build_add(sub, common, as_json)
    _build_lookups(sub, common, as_json)
    _build_storage(sub, common, as_json)


def _build_add(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    """Add the `add` action: register a folder as a new version."""
    p = sub.add_parser("add", parents=[common, as_json], help="register an adapter folder or a training run folder as a new version")
    p.add_argument("dir", metavar="DIR", help="adapter folder (adapter_config.json + adapter_model.safetensors) or run folder (adapter/, config.yaml)")
    p.add_argument("--name", required=True, help="registry name: letters, digits, '.', '_', '-'")
    p.add_argument("--tag", action="append", default=[], metavar="T", help="tag for this version (repeatable); moves the tag from older versions")
    p.add_argument("--domain", metavar="D", help="domain recorded with the adapter, e.g. retail")
    p.add_argument("--parent", metavar="REF", help="the adapter this one continued training from (default: what peftkit.json records)")
    p.add_argument("--base-model", metavar="DIR", help="local base model folder: records its fingerprint and checks shapes against it")
    p.add_argument("--base-config", metavar="FILE", help="the base model's config.json, for shape checks when peftkit.json is absent")
    p.add_argument("--allow-base-mismatch", action="store_true", help="register even if earlier versions of NAME used another base")
    p.add_argument("--max-rank", type=int, metavar="N", help="highest LoRA rank accepted (default 256)")
    p.add_argument("--include-extra-files", action="store_true",
                   help="also store files an adapter does not need (notes, logs); by default only adapter, tokenizer, "
                        "README.md and peftkit.json files are stored and the rest is listed")
    p.set_defaults(func=_add)


def _build_lookups(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    """Add the actions that read or relabel catalog entries: list, show, tag, untag, remove."""
    p = sub.add_parser("list", parents=[common, as_json], help="list registered adapters")
    p.add_argument("--domain", metavar="D", help="only this domain")
    p.add_argument("--base", metavar="B", help="only this base model (its name as trained, or its sha256 fingerprint or a prefix)")
    p.add_argument("--latest", action="store_true", help="only the latest version of each name")
    p.set_defaults(func=_list)

    p = sub.add_parser("show", parents=[common, as_json], help="show one adapter: lineage, base, config, metrics, files")
    p.add_argument("ref", metavar="REF")
    p.set_defaults(func=_show)

    p = sub.add_parser("tag", parents=[common], help="point NAME:TAG at a version")
    p.add_argument("ref", metavar="REF")
    p.add_argument("tag", metavar="TAG")
    p.set_defaults(func=_tag)

    p = sub.add_parser("untag", parents=[common], help="delete the tag NAME:TAG (the version it named stays)")
    p.add_argument("ref", metavar="NAME:TAG")
    p.set_defaults(func=_untag)

    p = sub.add_parser("remove", parents=[common], help="remove one version (or --all versions of a name)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--all", action="store_true", help="remove every version of NAME")
    p.set_defaults(func=_remove)


def _build_storage(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    """Add the actions on stored files: verify, export, import, gc, checkout."""
    p = sub.add_parser("verify", parents=[common, as_json], help="re-hash stored files and report any that are missing or corrupt (exit 1)")
    p.add_argument("ref", metavar="REF", nargs="?")
    p.set_defaults(func=_verify)

    p = sub.add_parser("export", parents=[common], help="write one version to a single archive file (.tar, or .tar.gz)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=_export)

    p = sub.add_parser("import", parents=[common, as_json], help="add a version from an archive made by export")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--name", help="register under this name instead of the archive's")
    p.add_argument("--allow-base-mismatch", action="store_true", help="import even if earlier versions of the name used another base")
    p.set_defaults(func=_import)

    p = sub.add_parser("gc", parents=[common, as_json], help="delete stored files no version uses and leftovers of interrupted adds")
    p.set_defaults(func=_gc)

    p = sub.add_parser("checkout", parents=[common], help="print a read-only folder holding the version's files, for PeftModel.from_pretrained")
    p.add_argument("ref", metavar="REF")
    p.set_defaults(func=_checkout)


# ---------------------------------------------------------------- handlers

def _open(args: argparse.Namespace, **kwargs):
    from peftkit.registry import Registry
    return Registry(args.registry, allow_network_fs=args.allow_network_fs, **kwargs)


def _add(args: argparse.Namespace) -> int:
    from peftkit.registry import DEFAULT_MAX_RANK
    reg = _open(args, max_rank=args.max_rank or DEFAULT_MAX_RANK)
    entry = reg.add(args.dir, args.name, tags=args.tag, domain=args.domain, allow_base_mismatch=args.allow_base_mismatch,
                    parent=args.parent, base_config=args.base_config, base_model_dir=args.base_model,
                    include_extra=args.include_extra_files)
    if args.json:
        return _print_json(entry.to_dict())
    if entry.left_out:
        shown = ", ".join(entry.left_out[:5]) + (f" and {len(entry.left_out) - 5} more" if len(entry.left_out) > 5 else "")
        print(f"note: not stored, as an adapter does not need them: {shown}; pass --include-extra-files to store them",
              file=sys.stderr)
    if not entry.new:
        print(f"already registered as {entry.ref} (same name and files); nothing added" + (f"; tags now {', '.join(entry.tags)}" if entry.tags else ""))
        return 0
    print(f"added {entry.ref}: {entry.method}{f' rank {entry.rank}' if entry.rank else ''}, {len(entry.files)} files, "
          f"{human_size(entry.size)}, base {entry.base_model or 'unknown'}" + (f", tags {', '.join(entry.tags)}" if entry.tags else ""))
    if entry.base_fingerprint is None:
        unchecked = " Its shapes were checked only against each other." if entry.base_config is None and entry.method != "full" else ""
        print("note: the base model is unknown (no peftkit.json and no --base-model DIR), so later versions cannot be "
              f"checked against it; pass --base-model DIR to record it.{unchecked}", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    entries = _open(args).list(domain=args.domain, base=args.base, latest=args.latest)
    if args.json:
        return _print_json([e.to_dict() for e in entries])
    if not entries:
        print("no adapters match" if (args.domain or args.base) else "no adapters registered; add one with `peftkit registry add DIR --name NAME`")
        return 0
    rows = [("REF", "TAGS", "METHOD", "RANK", "BASE", "DOMAIN", "SIZE", "CREATED")]
    rows += [(e.ref, ",".join(e.tags) or "-", e.method or "-", str(e.rank or "-"), e.base_model or "unknown",
              e.domain or "-", human_size(e.size), e.created_at[:19].replace("T", " ")) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows))
    return 0


def _show(args: argparse.Namespace) -> int:
    e = _open(args).show(args.ref)
    if args.json:
        return _print_json(e.to_dict())
    fields = [("ref", e.ref), ("tags", ", ".join(e.tags) or "-"), ("method", e.method), ("peft type", e.peft_type or "-"),
              ("rank", e.rank or "-"), ("base model", e.base_model or "unknown"), ("base fingerprint", e.base_fingerprint or "unknown"),
              ("data fingerprint", e.data_fingerprint or "-"), ("domain", e.domain or "-"), ("parent", e.parent or "-"),
              ("size", human_size(e.size)), ("created", e.created_at), ("registered", e.registered_at),
              ("content sha256", e.content_sha256)]
    for key, value in fields:
        print(f"{key + ':':18}{value}")
    if e.metrics:
        print("metrics:")
        for key, value in sorted(e.metrics.items()):
            print(f"  {key}: {_evaluation_summary(value) if key == 'evaluation' else value}")
    print("files:")
    for f in e.files:
        print(f"  {f.sha256[:12]}  {human_size(f.size):>9}  {f.path}")
    return 0


def _tag(args: argparse.Namespace) -> int:
    entry = _open(args).tag(args.ref, args.tag)
    print(f"{entry.name}:{args.tag} -> {entry.ref}")
    return 0


def _untag(args: argparse.Namespace) -> int:
    entry = _open(args).untag(args.ref)
    print(f"untagged {args.ref} (was {entry.ref}; tags now {', '.join(entry.tags) or 'none'})")
    return 0


def _remove(args: argparse.Namespace) -> int:
    removed = _open(args).remove(args.ref, all_versions=args.all)
    print("removed " + ", ".join(removed))
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = _open(args).verify(args.ref)
    if args.json:
        _print_json(report.to_dict())
        return 0 if report.ok else 1
    for problem in report.problems:
        print(problem)
    if report.catalog != "ok":
        print(f"catalog: {report.catalog}")
    if report.problems:
        print(f"to repair: {report.problems[0].fix}")
    state = "ok" if report.ok else f"FAILED: {len(report.problems)} bad files"
    orphans = f"; {report.orphans} unused blobs (run `peftkit registry gc`)" if report.orphans else ""
    print(f"{state}: {report.entries} entries, {report.files} files, {human_size(report.bytes)} re-hashed{orphans}")
    return 0 if report.ok else 1


def _export(args: argparse.Namespace) -> int:
    reg = _open(args)
    path = reg.export(args.ref, args.file)
    print(f"exported {reg.show(args.ref).ref} to {path} ({human_size(path.stat().st_size)})")
    return 0


def _import(args: argparse.Namespace) -> int:
    entry = _open(args).import_(args.file, name=args.name, allow_base_mismatch=args.allow_base_mismatch)
    if args.json:
        return _print_json(entry.to_dict())
    if entry.new:
        print(f"imported {args.file} as {entry.ref}")
    else:
        print(f"{args.file} is already registered as {entry.ref} (same name and files); nothing added")
    return 0


def _gc(args: argparse.Namespace) -> int:
    report = _open(args).gc()
    if args.json:
        return _print_json(report.to_dict())
    print(f"freed {report.blobs_removed} unused blobs ({human_size(report.bytes_freed)}), "
          f"{report.temps_removed} leftover temp files, {report.checkouts_removed} stale checkouts")
    return 0


def _checkout(args: argparse.Namespace) -> int:
    print(_open(args).checkout(args.ref))
    return 0


def _print_json(value: object) -> int:
    print(json.dumps(value, indent=2, default=str))
    return 0


def human_size(n: int) -> str:
    """Return a byte count as text with a unit (e.g. 1.2 MB)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _evaluation_summary(report: dict) -> str:
    """Return a stored `peftkit eval` report in one line: base -> adapter for the headline figures."""
    scores, parts = report.get("scores") or {}, []
    for key, label in (("loss", "answer loss"), ("token_accuracy", "token accuracy"), ("rouge_l", "ROUGE-L")):
        values = [scores.get(side, {}).get(key) for side in ("base", "adapter")]
        if None not in values:
            parts.append(f"{label} {values[0]:.3g} -> {values[1]:.3g}")
    forgetting = (report.get("forgetting") or {}).get("relative_change")
    if forgetting is not None:
        parts.append(f"general-text loss {forgetting:+.1%}")
    return f"{report.get('cases')} examples of {report.get('data')}: " + "; ".join(parts)

