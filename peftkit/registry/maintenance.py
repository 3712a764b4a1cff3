"""verify (re-hash every stored file, say exactly what is wrong) and gc (free what no entry uses)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from peftkit.registry.catalog import Entry
from peftkit.registry.store import remove_tree

if TYPE_CHECKING:
    from peftkit.registry import Registry


@dataclass
class Problem:
    """One stored file that is not what was registered."""

    ref: str
    path: str
    kind: str
    """missing (the blob is gone), corrupt (other bytes) or truncated (fewer bytes than registered)."""
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.ref} {self.path}: {self.kind} (expected {self.expected}, found {self.found})"

    @property
    def fix(self) -> str:
        """Return how to repair it: adding (or importing) the same files again rewrites the blob."""
        return f"re-add the original folder with --name {self.ref.split('@')[0]}, or import an export of {self.ref}"


@dataclass
class VerifyReport:
    """What verify checked and what it found wrong."""

    entries: int
    files: int
    bytes: int
    problems: list[Problem] = field(default_factory=list)
    orphans: int = 0
    """Blobs no entry uses (left by a crash or a removal); harmless, `gc` frees them."""
    catalog: str = "ok"
    """SQLite's own quick_check of the catalog file."""

    @property
    def ok(self) -> bool:
        """Return True when every file hashes to what was registered and the catalog is sound."""
        return not self.problems and self.catalog == "ok"

    def to_dict(self) -> dict:
        """Return the report as JSON-ready data."""
        return {"ok": self.ok, "entries": self.entries, "files": self.files, "bytes": self.bytes, "orphans": self.orphans,
                "catalog": self.catalog, "problems": [vars(p) for p in self.problems]}


@dataclass
class GcReport:
    """What gc deleted."""

    blobs_removed: int = 0
    bytes_freed: int = 0
    temps_removed: int = 0
    checkouts_removed: int = 0

    def to_dict(self) -> dict:
        """Return the report as JSON-ready data."""
        return dict(vars(self))


def verify_store(reg: "Registry", entry: Entry | None) -> VerifyReport:
    """Return the report of re-hashing one entry's files, or every entry's (each shared blob is read once)."""
    if entry is None:
        rows = reg.catalog.all_files()
        entries = len({ref for ref, _ in rows})
    else:
        rows, entries = [(entry.ref, f) for f in entry.files], 1
    report = VerifyReport(entries=entries, files=len(rows), bytes=sum(f.size for _, f in rows))
    hashed: dict[str, tuple[str, int] | None] = {}
    for ref, f in rows:
        if f.sha256 not in hashed:
            hashed[f.sha256] = reg.store.hash_blob(f.sha256)
        found = hashed[f.sha256]
        if found is None:
            report.problems.append(Problem(ref, f.path, "missing", f"blob {f.sha256[:12]}", "no file in the store"))
        elif found[1] != f.size:
            report.problems.append(Problem(ref, f.path, "truncated" if found[1] < f.size else "corrupt",
                                           f"{f.size} bytes", f"{found[1]} bytes"))
        elif found[0] != f.sha256:
            report.problems.append(Problem(ref, f.path, "corrupt", f"sha256 {f.sha256[:12]}", f"sha256 {found[0][:12]}"))
    report.catalog = reg.catalog.conn.execute("PRAGMA quick_check").fetchone()[0]
    if entry is None:
        used = reg.catalog.referenced(reg.catalog.conn)
        report.orphans = sum(1 for sha, _ in reg.store.iter_blobs() if sha not in used)
    return report


def collect_garbage(reg: "Registry", temps: bool = True) -> GcReport:
    """Return what was deleted: unused blobs and checkouts (under the write lock), and dead writers' temp files."""
    report = GcReport()
    # The write lock keeps an add from renaming a blob into place between our look and our delete.
    with reg.catalog.write() as conn:
        used = reg.catalog.referenced(conn)
        for sha, path in reg.store.iter_blobs():
            if sha not in used:
                report.bytes_freed += reg.store.delete_blob(path)
                report.blobs_removed += 1
        refs = reg.catalog.refs()
        for folder in reg.store.iter_checkouts():
            if folder.name not in refs:
                remove_tree(folder)
                report.checkouts_removed += 1
    if temps:
        for path in reg.store.stale_temps():
            remove_tree(path)
            report.temps_removed += 1
    return report
