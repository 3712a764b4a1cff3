"""Export one entry to a single tar archive and import it back, safely.

The archive holds `peftkit-manifest.json` (the catalog metadata and each file's sha256) and
`files/<path>` for every stored file. Import never calls extract(): it checks every member first
(regular files only: no links, devices, absolute paths or '..'), streams each file into the store
while hashing it, and refuses any file whose hash or size differs from the manifest.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from peftkit.atomic import atomic_path
from peftkit.registry.catalog import Entry
from peftkit.registry.errors import ArchiveError, InvalidNameError
from peftkit.registry.names import check_name, check_relpath
from peftkit.registry.validate import check_method, check_types, refuse_pickles, validate_files

if TYPE_CHECKING:
    from peftkit.registry import Registry

FORMAT = "peftkit-adapter-archive"
MANIFEST = "peftkit-manifest.json"
FILES = "files/"
MAX_MANIFEST = 64 * 1024 * 1024
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
ENTRY_KEYS = ("method", "peft_type", "rank", "base_model", "base_fingerprint", "data_fingerprint", "domain",
              "parent", "created_at", "registered_at", "metrics", "config", "base_config", "lineage")
# The manifest's facts that go into the catalog as they are (peft_type and rank come from the headers instead).
ENTRY_TYPES = {"method": str, "base_model": str, "base_fingerprint": str, "data_fingerprint": str,
               "parent": str, "created_at": str, "metrics": dict, "config": dict, "base_config": dict, "lineage": dict}


class _HashingReader:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        block = self.raw.read(n)
        self.sha.update(block)
        return block


def export_entry(reg: "Registry", entry: Entry, file: Path) -> Path:
    """Return the archive path after writing the entry there atomically (.tar, or .tar.gz / .tgz compressed)."""
    manifest = {"format": FORMAT, "format_version": 1, "name": entry.name, "version": entry.version, "tags": entry.tags,
                "entry": {k: getattr(entry, k) for k in ENTRY_KEYS},
                "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in entry.files]}
    mode = "w:gz" if file.name.endswith((".gz", ".tgz")) else "w"
    try:
        with atomic_path(file) as tmp, tarfile.open(tmp, mode, format=tarfile.PAX_FORMAT) as tf:
            _add_bytes(tf, MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
            for f in entry.files:
                with open(reg.store.blob_path(f.sha256), "rb") as raw:
                    reader = _HashingReader(raw)
                    tf.addfile(_info(FILES + f.path, f.size), reader)
                if reader.sha.hexdigest() != f.sha256:
                    raise ArchiveError(f"{entry.ref} {f.path} is corrupt in the store; nothing exported; run `peftkit registry verify`")
    except FileNotFoundError as exc:
        raise ArchiveError(f"cannot export {entry.ref}: {exc.filename} is missing; run `peftkit registry verify`") from None
    return file


def import_archive(reg: "Registry", file: Path, allow_base_mismatch: bool, max_rank: int, name: str | None = None) -> Entry:
    """Return the Entry the archive became; entry.new is False when the same name and files were already registered."""
    if not file.is_file():
        raise ArchiveError(f"{file} does not exist; pass a file made by `peftkit registry export`")
    try:
        tf = tarfile.open(file, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"{file} is not a tar archive ({exc}); pass a file made by `peftkit registry export`") from None
    with tf:
        members = _checked_members(tf, file)
        manifest = _read_manifest(tf, members, file)
        listed = _checked_files(manifest, members, file)
        name = check_name(name or manifest.get("name"), "name in archive")
        tags = [t for t in manifest.get("tags") or [] if _is_name(t)]
        staged = {}
        try:
            for rel, m in members.items():
                if rel != MANIFEST:
                    staged[rel[len(FILES):]] = s = reg.store.stage_stream(tf.extractfile(m))
                    _check_hash(file, rel[len(FILES):], s, listed[rel[len(FILES):]])
            entry = manifest.get("entry") or {}
            if not isinstance(entry, dict):
                raise ArchiveError(f"{file}: {MANIFEST} entry must be a JSON object; the archive is damaged, export it again")
            check_types(entry, ENTRY_TYPES, f"{file}: {MANIFEST} entry", "the archive is damaged; export it again")
            info = validate_files({rel: s.tmp for rel, s in staged.items()}, entry.get("base_config"), max_rank)
            check_method(entry.get("method"), info, f"{file}: {MANIFEST} entry")
            meta = _metadata(entry, info, manifest)
            return reg._register(name, staged, meta, tags, allow_base_mismatch, entry.get("parent"),
                                 parent_required=False, move_tags=False)  # never take a tag from another version
        finally:
            reg.store.discard(list(staged.values()))


# ---------------------------------------------------------------- internals

def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    return info


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    tf.addfile(_info(name, len(data)), io.BytesIO(data))


def _checked_members(tf: tarfile.TarFile, file: Path) -> dict[str, tarfile.TarInfo]:
    # Every member is judged before a single byte is written anywhere.
    members: dict[str, tarfile.TarInfo] = {}
    for m in tf.getmembers():
        name = m.name
        if m.issym() or m.islnk():
            raise ArchiveError(f"{file}: member {name!r} is a link (to {m.linkname!r}); archives with links are refused")
        if not (m.isfile() or m.isdir()):
            raise ArchiveError(f"{file}: member {name!r} is a device, pipe or other special file; refused")
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or PurePosixPath(name).is_absolute():
            raise ArchiveError(f"{file}: member {name!r} has an absolute path; refused")
        if ".." in PurePosixPath(name.replace("\\", "/")).parts:
            raise ArchiveError(f"{file}: member {name!r} climbs out with '..'; refused")
        if m.isdir():
            continue
        if name != MANIFEST and not name.startswith(FILES):
            raise ArchiveError(f"{file}: member {name!r} is neither {MANIFEST} nor under {FILES}; not a peftkit export")
        if name in members:
            raise ArchiveError(f"{file}: member {name!r} appears twice; the archive is tampered with")
        members[name] = m
    return members


def _read_manifest(tf: tarfile.TarFile, members: dict[str, tarfile.TarInfo], file: Path) -> dict:
    m = members.get(MANIFEST)
    if m is None or m.size > MAX_MANIFEST:
        raise ArchiveError(f"{file}: no {MANIFEST} (or an oversized one); not a peftkit export")
    try:
        manifest = json.loads(tf.extractfile(m).read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ArchiveError(f"{file}: {MANIFEST} is not valid JSON; the archive is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArchiveError(f"{file}: {MANIFEST} is not a {FORMAT} manifest")
    return manifest


def _checked_files(manifest: dict, members: dict[str, tarfile.TarInfo], file: Path) -> dict[str, dict]:
    listed: dict[str, dict] = {}
    for f in manifest.get("files") or []:
        if not isinstance(f, dict) or not SHA_RE.match(str(f.get("sha256"))) or not isinstance(f.get("size"), int):
            raise ArchiveError(f"{file}: manifest file entry {f!r} needs path, a 64-hex sha256 and an integer size")
        try:
            listed[check_relpath(f.get("path"), "archive file")] = f
        except InvalidNameError as exc:
            raise ArchiveError(f"{file}: {exc}") from None
    refuse_pickles(list(listed), str(file))
    present = {n[len(FILES):] for n in members if n != MANIFEST}
    if present != set(listed):
        missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
        raise ArchiveError(f"{file}: the files do not match the manifest (missing: {', '.join(missing) or 'none'}; "
                           f"not listed: {', '.join(extra) or 'none'}); the archive is incomplete or tampered with")
    return listed


def _check_hash(file: Path, rel: str, staged, expected: dict) -> None:
    if staged.sha256 != expected["sha256"] or staged.size != expected["size"]:
        raise ArchiveError(f"{file}: {rel} is corrupt (sha256 {staged.sha256[:12]}, {staged.size} bytes; the manifest "
                           f"says {expected['sha256'][:12]}, {expected['size']} bytes); nothing imported")


def _is_name(value: object) -> bool:
    try:
        check_name(value, "tag")  # type: ignore[arg-type]
    except InvalidNameError:
        return False
    return True


def _metadata(entry: dict, info: dict, manifest: dict) -> dict:
    # Facts the headers prove (peft type, rank) come from our own check, not from the manifest.
    domain = entry.get("domain") if _is_name(entry.get("domain")) else None
    lineage = {**(entry.get("lineage") or {}), "imported_from": f"{manifest.get('name')}@{manifest.get('version')}"}
    return {
        "method": entry.get("method"), "peft_type": info["peft_type"], "rank": info["rank"],
        "base_model": entry.get("base_model"), "base_fingerprint": entry.get("base_fingerprint"),
        "data_fingerprint": entry.get("data_fingerprint"), "domain": domain,
        "created_at": entry.get("created_at") or time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "metrics": json.dumps(entry.get("metrics") or {}),
        "detail": json.dumps({"config": entry.get("config"), "base_config": entry.get("base_config"), "lineage": lineage}),
    }
