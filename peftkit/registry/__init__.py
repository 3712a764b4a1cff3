"""The adapter registry: a SQLite catalog plus a content-addressed file store, with lineage and integrity.

    reg = Registry()                        # $PEFTKIT_HOME/registry, default ~/.peftkit/registry
    entry = reg.add("runs/retail", name="retail-bot", tags=["stable"], domain="retail")
    reg.show("retail-bot:stable").ref      # 'retail-bot@1'
    path = reg.checkout("retail-bot@1")     # read-only folder for PeftModel.from_pretrained(base, path)

Importing this package, listing and showing never import torch.
"""
from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from peftkit.registry.catalog import Catalog, Entry, FileRecord
from peftkit.registry.errors import (AdapterValidationError, ArchiveError, BaseMismatchError, DiskFullError, InvalidNameError,
                                     PickleRefusedError, RegistryError, UnknownRefError, refuse_when_full)
from peftkit.registry.maintenance import GcReport, Problem, VerifyReport, collect_garbage, verify_store
from peftkit.registry.mounts import check_local
from peftkit.registry.names import Ref, check_name, parse_ref
from peftkit.registry.source import Base, is_adapter_file, read_lineage, read_source, resolve_base
from peftkit.registry.store import Staged, Store, remove_tree
from peftkit.registry.validate import DEFAULT_MAX_RANK, check_method, validate_files

__all__ = ["Registry", "Entry", "FileRecord", "VerifyReport", "Problem", "GcReport", "RegistryError", "InvalidNameError",
           "UnknownRefError", "PickleRefusedError", "AdapterValidationError", "BaseMismatchError", "ArchiveError",
           "DiskFullError", "DEFAULT_MAX_RANK", "default_path"]


def default_path() -> Path:
    """Return the default registry folder, $PEFTKIT_HOME/registry."""
    from peftkit.config import peftkit_home  # imported here: it pulls in yaml and inspect, which look-ups do not need
    return peftkit_home() / "registry"


class Registry:
    """A registry folder: catalog.db (SQLite) + blobs/ (files by sha256) + checkouts/ (read-only folders)."""

    def __init__(self, path: str | Path | None = None, max_rank: int = DEFAULT_MAX_RANK, busy_timeout: float = 60.0,
                 allow_network_fs: bool = False):
        self.path = Path(path).expanduser() if path is not None else default_path()
        self.max_rank = max_rank
        check_local(self.path, allow=allow_network_fs)  # before SQLite opens the catalog in WAL mode
        self.store = Store(self.path)
        with refuse_when_full("opening the registry catalog", "the catalog was not created or changed", self.path):
            self.catalog = Catalog(self.path / "catalog.db", busy_timeout=busy_timeout)

    def add(self, src_dir: str | Path, name: str, tags: Iterable[str] = (), domain: str | None = None,
            allow_base_mismatch: bool = False, parent: str | Path | None = None, *, base_config: str | Path | None = None,
            base_model_dir: str | Path | None = None, max_rank: int | None = None, include_extra: bool = False) -> Entry:
        """Return the Entry of a new version of `name` holding the adapter (or run) folder's files.

        Only adapter files are stored (see registry.source.ADAPTER_FILES); include_extra stores every file
        in the folder, and entry.left_out lists what was not stored.
        """
        tags, domain = self._check_labels(name, tags, domain)
        max_rank = max_rank or self.max_rank
        source = read_source(src_dir, include_extra=include_extra)
        base, recorded = resolve_base(source, base_config, base_model_dir)
        if recorded and not allow_base_mismatch:
            raise BaseMismatchError(f"{source.root}: trained on base {recorded[:19]}… but --base-model is {base.fingerprint[:19]}…; "
                                    "pass the base it was trained on, or --allow-base-mismatch if they are compatible")
        validate_files(source.files, base.config, max_rank)  # fail before copying anything
        staged: dict[str, Staged] = {}
        with refuse_when_full(f"adding {source.root} as {name}", "nothing was registered and no partial file was kept", self.path):
            try:
                for rel, path in source.files.items():
                    staged[rel] = self.store.stage_file(path)
                # Check and record what is stored, which may differ from what the folder held a moment ago.
                info = validate_files({rel: s.tmp for rel, s in staged.items()}, base.config, max_rank)
                if "peftkit.json" in staged:
                    source.lineage = read_lineage(staged["peftkit.json"].tmp, source.root / "peftkit.json")
                check_method(source.lineage.get("method"), info, str(source.root / "peftkit.json"))
                meta = _metadata(source, base, info, domain)
                parent_ref, required = self._parent_ref(parent, source)
                entry = self._register(name, staged, meta, tags, allow_base_mismatch, parent_ref, parent_required=required)
            finally:
                self.store.discard(list(staged.values()))
        entry.left_out = source.left_out
        return entry

    def list(self, domain: str | None = None, base: str | None = None, latest: bool = False) -> list[Entry]:
        """Return summaries (no config, no files) of every version, or the latest of each name, sorted by name."""
        return self.catalog.list(domain=domain, base=base, latest=latest)

    def show(self, ref: str) -> Entry:
        """Return the full Entry (config, metrics, lineage, files) for `name`, `name@3` or `name:tag`."""
        return self.catalog.lookup(parse_ref(ref))

    def tag(self, ref: str, tag: str) -> Entry:
        """Return the entry after pointing name:tag at it (a tag names one version at a time and can move)."""
        check_name(tag, "tag")
        with refuse_when_full(f"tagging {ref} as {tag}", "the tag was not changed", self.path), self.catalog.write() as conn:
            entry = self.catalog.lookup(parse_ref(ref), detail=False)
            self.catalog.set_tag(conn, entry.name, tag, entry.id)
        return self.show(entry.ref)

    def untag(self, ref: str) -> Entry:
        """Return the entry `name:tag` named, after deleting that tag (the version itself stays)."""
        parsed = parse_ref(ref)
        if parsed.tag is None:
            raise InvalidNameError(f"untag takes NAME:TAG, e.g. {parsed.name}:stable; got {ref!r}")
        with refuse_when_full(f"untagging {ref}", "the tag was not changed", self.path), self.catalog.write() as conn:
            entry = self.catalog.lookup(parsed, detail=False)
            self.catalog.drop_tag(conn, parsed.name, parsed.tag)
        return self.show(entry.ref)

    def set_evaluation(self, ref: str, report: dict[str, Any]) -> Entry:
        """Return the entry after storing an evaluation report (`peftkit eval`) in its metrics, under "evaluation"."""
        with refuse_when_full(f"storing the evaluation of {ref}", "the entry was not changed", self.path), \
                self.catalog.write() as conn:
            entry = self.catalog.lookup(parse_ref(ref))
            self.catalog.set_metrics(conn, entry.id, {**(entry.metrics or {}), "evaluation": report})
        return self.show(entry.ref)

    def remove(self, ref: str, all_versions: bool = False) -> list[str]:
        """Return the refs removed: one version (`name@3`, `name:tag`, or `name` when it has one version) or all."""
        parsed = parse_ref(ref)
        with refuse_when_full(f"removing {ref}", "nothing was removed", self.path), self.catalog.write() as conn:
            target = self.catalog.lookup(parsed, detail=False)
            ids = self.catalog.version_ids(parsed.name)
            if all_versions and parsed.version is None and parsed.tag is None:
                chosen = ids
            elif parsed.version is None and parsed.tag is None and len(ids) > 1:
                raise RegistryError(f"{parsed.name} has versions {', '.join(str(v) for _, v in ids)}; remove one with "
                                    f"{parsed.name}@{ids[-1][1]} or all of them with --all")
            else:
                chosen = [(target.id, target.version)]
            conn.executemany("DELETE FROM adapters WHERE id = ?", [(i,) for i, _ in chosen])
        removed = [f"{parsed.name}@{v}" for _, v in chosen]
        for r in removed:
            remove_tree(self.store.checkouts / r)
        collect_garbage(self, temps=False)  # free blobs no other version uses
        return removed

    def checkout(self, ref: str) -> Path:
        """Return a read-only folder with the adapter's files exactly as registered (loadable by PeftModel.from_pretrained)."""
        entry = self.show(ref)
        with refuse_when_full(f"checking out {entry.ref}", "no checkout folder was written", self.path):
            return self.store.checkout(entry.ref, [(f.path, f.sha256) for f in entry.files])

    def verify(self, ref: str | None = None) -> VerifyReport:
        """Return a report of every stored file re-hashed: missing or corrupt files, by entry and path."""
        return verify_store(self, None if ref is None else self.show(ref))

    def export(self, ref: str, file: str | Path) -> Path:
        """Return the path of one archive (tar) holding the entry's files and catalog metadata."""
        from peftkit.registry.archive import export_entry
        entry = self.show(ref)
        with refuse_when_full(f"exporting {entry.ref} to {file}", f"no archive was written at {file}", Path(file).absolute().parent):
            return export_entry(self, entry, Path(file))

    def import_(self, file: str | Path, name: str | None = None, allow_base_mismatch: bool = False,
                max_rank: int | None = None) -> Entry:
        """Return the Entry an export archive became, under its own name or `name` (entry.new is False for a duplicate)."""
        from peftkit.registry.archive import import_archive
        with refuse_when_full(f"importing {file}", "nothing was registered and no partial file was kept", self.path):
            return import_archive(self, Path(file), allow_base_mismatch, max_rank or self.max_rank, name=name)

    def gc(self) -> GcReport:
        """Return what was freed: blobs no entry uses, temp files of dead writers, checkouts of removed versions."""
        return collect_garbage(self, temps=True)

    def close(self) -> None:
        """Close the catalog connection."""
        self.catalog.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ shared by add and import

    def _check_labels(self, name: str, tags: Iterable[str], domain: str | None) -> tuple[list[str], str | None]:
        check_name(name)
        tags = [check_name(t, "tag") for t in tags]
        return tags, None if domain is None else check_name(domain, "domain")

    def _register(self, name: str, staged: dict[str, Staged], meta: dict[str, Any], tags: list[str],
                  allow_base_mismatch: bool, parent: str | None, parent_required: bool = True,
                  move_tags: bool = True) -> Entry:
        files = [FileRecord(rel, s.sha256, s.size) for rel, s in sorted(staged.items())]
        meta.update(content_sha256=content_digest(files), size=sum(f.size for f in files), registered_at=_now())
        created: list[Path] = []
        try:
            with self.catalog.write() as conn:
                if not allow_base_mismatch:
                    self._check_base(conn, name, meta)
                adapter_id = self.catalog.find_same_content(conn, name, meta["content_sha256"])
                new = adapter_id is None
                if new:
                    meta["parent"], meta["parent_id"] = self._lookup_parent(parent, parent_required)
                # Every blob is in place before the row exists. For a duplicate this rewrites the blobs with
                # freshly hashed bytes, which repairs any that `verify` found corrupt.
                created = self.store.commit(list(staged.values()))
                if new:
                    adapter_id, _ = self.catalog.insert(conn, name, meta, files)
                for tag in tags:
                    self.catalog.set_tag(conn, name, tag, adapter_id, move=move_tags)
                version = conn.execute("SELECT version FROM adapters WHERE id = ?", (adapter_id,)).fetchone()[0]
        except BaseException:
            self._forget(created)  # the row was not written (a full disk, say): its new blobs must not linger
            raise
        if not new:  # its hard links may point at the blobs just replaced; the next checkout rebuilds it
            remove_tree(self.store.checkouts / f"{name}@{version}")
        entry = self.show(f"{name}@{version}")
        entry.new = new
        return entry

    def _forget(self, blobs: list[Path]) -> None:
        """Delete blobs an add created before its row failed, sparing any another add has come to use meanwhile."""
        if not blobs:
            return
        try:
            with self.catalog.write() as conn:  # the lock every add commits blobs under
                used = self.catalog.referenced(conn)
                self.store.forget([b for b in blobs if b.name not in used])
        except (OSError, sqlite3.Error):
            pass  # they stay as unused blobs, which `registry gc` frees

    def _check_base(self, conn, name: str, meta: dict[str, Any]) -> None:
        row = self.catalog.known_base(conn, name)
        if row is None or row["base_fingerprint"] == meta["base_fingerprint"]:
            return
        found = f"{meta['base_fingerprint'][:19]}… ({meta['base_model']})" if meta["base_fingerprint"] else "an unknown base (pass --base-model DIR)"
        raise BaseMismatchError(
            f"{name}@{row['version']} was trained on base {row['base_fingerprint'][:19]}… ({row['base_model']}) but this adapter on "
            f"{found}; register it under another name, or pass --allow-base-mismatch (allow_base_mismatch=True) if the bases are compatible")

    def _parent_ref(self, parent: str | Path | None, source) -> tuple[str | None, bool]:
        """Return (the parent's reference, or the text to record, and whether it must resolve)."""
        # A parent given to add() must exist; one only recorded in peftkit.json is kept as text when it
        # does not, so that a finished training run is never refused over its lineage.
        explicit = parent is not None
        value = parent if explicit else source.lineage.get("parent")
        if value is None or str(value) == "":
            return None, False
        if isinstance(value, Path) or "/" in str(value) or os.sep in str(value):
            ref = self._ref_of_folder(Path(value))
            if ref is None and explicit:
                raise UnknownRefError(f"parent folder {value} matches no registered adapter; register it first, or pass no parent")
            return ref or str(value), ref is not None
        return str(value), explicit

    def _ref_of_folder(self, folder: Path) -> str | None:
        """Return name@version of the entry holding exactly this folder's files (training continued from it), or None."""
        from peftkit.fingerprint import file_sha256
        try:
            files = read_source(folder, include_extra=True).files
        except RegistryError:
            return None
        records = {rel: FileRecord(rel, file_sha256(p), p.stat().st_size) for rel, p in sorted(files.items())}
        # The parent was stored with its extra files (--include-extra-files) or, by default, without them.
        digests = (content_digest(list(records.values())), content_digest([r for rel, r in records.items() if is_adapter_file(rel)]))
        row = self.catalog.conn.execute("SELECT name, version FROM adapters WHERE content_sha256 IN (?, ?) ORDER BY id LIMIT 1",
                                        digests).fetchone()
        return None if row is None else f"{row[0]}@{row[1]}"

    def _lookup_parent(self, parent: str | None, required: bool) -> tuple[str | None, int | None]:
        if parent is None:
            return None, None
        try:
            entry = self.catalog.lookup(parse_ref(parent), detail=False)
        except (UnknownRefError, InvalidNameError) as exc:
            if not required:  # e.g. an imported adapter's parent may live only in the registry it came from
                return parent, None
            raise UnknownRefError(f"parent {parent}: {exc}; register the parent first, or pass no parent") from None
        return entry.ref, entry.id


def content_digest(files: list[FileRecord]) -> str:
    """Return the sha256 over an entry's (path, sha256, size) list: equal exactly when the files are equal."""
    import hashlib
    lines = "".join(f"{f.path}\0{f.sha256}\0{f.size}\n" for f in sorted(files, key=lambda f: f.path))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _metadata(source, base: Base, info: dict[str, Any], domain: str | None) -> dict[str, Any]:
    lin = source.lineage
    method = lin.get("method") or info["method"]
    extras = {k: v for k, v in lin.items() if k not in ("config", "metrics", "base_config")}
    return {
        "method": method, "peft_type": info["peft_type"], "rank": info["rank"], "base_model": base.model,
        "base_fingerprint": base.fingerprint, "data_fingerprint": lin.get("data_fingerprint"), "domain": domain,
        "created_at": lin.get("created_at") or _now(),
        "metrics": json.dumps(lin.get("metrics") or source.run_metrics or {}),
        "detail": json.dumps({"config": lin.get("config") or source.run_config, "base_config": base.config,
                              "lineage": {**extras, "source": str(source.root.resolve())}}),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
