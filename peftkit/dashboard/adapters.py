"""The registry as the page shows it: every version with its lineage and scores, one entry whole, and its parents.

Reads and changes go through peftkit.registry.Registry, the API the `peftkit registry` commands use,
so the page can do nothing the command line could not. No torch here.
"""
from __future__ import annotations

from typing import Any

from peftkit.registry import Entry, InvalidNameError, Registry, UnknownRefError

MAX_PARENTS = 32


def list_entries(reg: Registry) -> list[dict[str, Any]]:
    """Return every version (sorted by name, then version) with its headline scores and its children's refs."""
    entries = reg.list()
    children: dict[str, list[str]] = {}
    for e in entries:
        if e.parent:
            children.setdefault(e.parent, []).append(e.ref)
    latest = {e.name: e.version for e in entries}  # sorted by version: the last one seen is the latest
    return [{**summary(e), "latest": latest[e.name] == e.version, "children": children.get(e.ref, [])} for e in entries]


def summary(e: Entry) -> dict[str, Any]:
    """Return one version's catalog row with its headline scores (no config, no files)."""
    return {"ref": e.ref, "name": e.name, "version": e.version, "tags": e.tags, "domain": e.domain, "method": e.method,
            "peft_type": e.peft_type, "rank": e.rank, "base_model": e.base_model, "base_fingerprint": e.base_fingerprint,
            "data_fingerprint": e.data_fingerprint, "parent": e.parent, "size": e.size, "created_at": e.created_at,
            "registered_at": e.registered_at, "scores": headline(e.metrics or {})}


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Return the figures a table row has room for: losses from training, base -> adapter from `peftkit eval`."""
    out = {k: metrics.get(k) for k in ("train_loss", "eval_loss", "eval_token_accuracy") if metrics.get(k) is not None}
    report = metrics.get("evaluation")
    if isinstance(report, dict):
        scores = report.get("scores") or {}
        out["evaluation"] = {key: [scores.get(side, {}).get(key) for side in ("base", "adapter")]
                             for key in ("loss", "token_accuracy", "rouge_l")
                             if all(scores.get(side, {}).get(key) is not None for side in ("base", "adapter"))}
        out["evaluation_cases"] = report.get("cases")
        change = (report.get("forgetting") or {}).get("relative_change")
        if change is not None:
            out["forgetting"] = change
    return out


def entry_detail(reg: Registry, ref: str) -> dict[str, Any]:
    """Return one version whole (config, lineage, files, metrics) with its chain of registered parents."""
    entry = reg.show(ref)
    return {**entry.to_dict(), "scores": headline(entry.metrics or {}), "parents": parent_chain(reg, entry)}


def parent_chain(reg: Registry, entry: Entry) -> list[dict[str, Any]]:
    """Return the parents from the nearest up, as far as they are registered (a parent kept only as text ends it)."""
    chain, seen, parent = [], {entry.ref}, entry.parent
    while parent and len(chain) < MAX_PARENTS:
        try:
            found = reg.show(parent) if "/" not in parent else None
        except (UnknownRefError, InvalidNameError):
            found = None
        if found is None or found.ref in seen:
            chain.append({"ref": parent, "registered": False})
            break
        seen.add(found.ref)
        chain.append({"ref": found.ref, "registered": True, "method": found.method, "data_fingerprint": found.data_fingerprint})
        parent = found.parent
    return chain
