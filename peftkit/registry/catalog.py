"""The SQLite catalog: one row per adapter version, its files, its tags. Standard library only, never torch.

WAL lets readers run while a writer commits; every write runs in one `BEGIN IMMEDIATE`
transaction, so the version number is taken and the row inserted under the same lock and
concurrent adds from several processes get versions 1, 2, 3... with none lost.
"""
from __future__ import annotations

import difflib
import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from peftkit.registry.errors import RegistryError, UnknownRefError
from peftkit.registry.names import Ref

SCHEMA = """
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY,
    next_version INTEGER NOT NULL DEFAULT 1          -- never reused, so name@3 always means the same files
);
CREATE TABLE IF NOT EXISTS adapters (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL REFERENCES names(name),
    version INTEGER NOT NULL,
    method TEXT, peft_type TEXT, rank INTEGER,
    base_model TEXT, base_fingerprint TEXT, data_fingerprint TEXT,
    domain TEXT,
    parent TEXT,                                      -- "name@version" as recorded, kept if the parent is removed
    parent_id INTEGER REFERENCES adapters(id) ON DELETE SET NULL,
    content_sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    metrics TEXT NOT NULL DEFAULT '{}',
    UNIQUE (name, version)
);
-- Config, base config and lineage extras, read by show only: kept apart so list scans narrow rows.
CREATE TABLE IF NOT EXISTS details (
    adapter_id INTEGER PRIMARY KEY REFERENCES adapters(id) ON DELETE CASCADE,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS adapters_domain ON adapters(domain);
CREATE INDEX IF NOT EXISTS adapters_base ON adapters(base_model);
CREATE INDEX IF NOT EXISTS adapters_content ON adapters(name, content_sha256);
CREATE TABLE IF NOT EXISTS files (
    adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (adapter_id, path)
);
CREATE INDEX IF NOT EXISTS files_sha ON files(sha256);
CREATE TABLE IF NOT EXISTS tags (
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    PRIMARY KEY (name, tag)
);
CREATE INDEX IF NOT EXISTS tags_adapter ON tags(adapter_id);
"""
# The order matters: row_to_entry passes columns 1-14 positionally to Entry.
SUMMARY_COLUMNS = ("id, name, version, method, peft_type, rank, base_model, base_fingerprint, data_fingerprint, domain, "
                   "parent, content_sha256, size, created_at, registered_at, metrics")
TAGS_SQL = "(SELECT group_concat(tag, ',') FROM tags t WHERE t.adapter_id = a.id) AS tags"


@dataclass
class FileRecord:
    """One stored file of an adapter."""

    path: str
    sha256: str
    size: int


@dataclass
class Entry:
    """One registered adapter version. `list` fills the summary; `show` also fills config, base_config and files."""

    name: str
    version: int
    method: str | None
    peft_type: str | None
    rank: int | None
    base_model: str | None
    base_fingerprint: str | None
    data_fingerprint: str | None
    domain: str | None
    parent: str | None
    content_sha256: str
    size: int
    created_at: str
    registered_at: str
    metrics: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None
    base_config: dict[str, Any] | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    files: list[FileRecord] = field(default_factory=list)
    new: bool = True
    """False when add/import found these exact files already registered under this name."""
    left_out: list[str] = field(default_factory=list)
    """Files of the added folder that were not stored (not adapter files; add include_extra=True to store them)."""
    id: int = field(default=0, repr=False)

    @property
    def ref(self) -> str:
        """Return the immutable reference `name@version`."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as plain JSON-ready data (with `ref`, without the row id)."""
        # Shallow on purpose: asdict() deep-copies every config dict, ten times slower over a big list.
        out = {"ref": self.ref, **{k: getattr(self, k) for k in ENTRY_FIELDS}}
        out["files"] = [vars(f) for f in self.files]
        return out


class Catalog:
    """The catalog database of one registry folder."""

    def __init__(self, path: Path, busy_timeout: float = 60.0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        self.conn.execute("PRAGMA foreign_keys = ON")
        self._set_wal()
        self.conn.execute("PRAGMA synchronous = FULL")  # a committed add survives power loss
        if self.conn.execute("PRAGMA user_version").fetchone()[0] < 1:
            # Statement by statement: executescript() would commit outside our transaction.
            with self.write() as c:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        c.execute(statement)
                c.execute("PRAGMA user_version = 1")

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """Yield the connection inside one BEGIN IMMEDIATE transaction; commit on success, roll back on error."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back by itself (a full disk at COMMIT does that).
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def lookup(self, ref: Ref, detail: bool = True) -> Entry:
        """Return the entry a reference points at (with config and files when detail); raise UnknownRefError."""
        if ref.tag is not None:
            where, args = "a.id = (SELECT adapter_id FROM tags WHERE name = ? AND tag = ?)", (ref.name, ref.tag)
        elif ref.version is not None:
            where, args = "a.name = ? AND a.version = ?", (ref.name, ref.version)
        else:
            where, args = "a.name = ? ORDER BY a.version DESC LIMIT 1", (ref.name,)
        row = self._tuples(f"SELECT {SUMMARY_COLUMNS}, {TAGS_SQL} FROM adapters a WHERE {where}", args).fetchone()
        if row is None:
            raise UnknownRefError(self._missing(ref))
        entry = row_to_entry(row)
        if detail:
            extra = json.loads(self.conn.execute("SELECT detail FROM details WHERE adapter_id = ?", (entry.id,)).fetchone()[0])
            entry.config, entry.base_config, entry.lineage = extra.get("config"), extra.get("base_config"), extra.get("lineage", {})
            entry.files = [FileRecord(*r) for r in self._tuples(
                "SELECT path, sha256, size FROM files WHERE adapter_id = ? ORDER BY path", (entry.id,))]
        return entry

    def list(self, domain: str | None = None, base: str | None = None, latest: bool = False) -> list[Entry]:
        """Return summaries of every version (or the latest of each name), ordered by name then version."""
        clauses, args = [], []
        if domain is not None:
            clauses.append("a.domain = ?")
            args.append(domain)
        if base is not None:  # what the user typed at training time, or the fingerprint (a prefix is enough)
            clauses.append("(a.base_model = ? OR a.base_fingerprint = ? OR a.base_fingerprint LIKE ?)")
            args += [base, base, (base if base.startswith("sha256:") else "sha256:" + base) + "%"]
        if latest:
            clauses.append("a.version = (SELECT MAX(version) FROM adapters b WHERE b.name = a.name)")
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        sql = f"SELECT {SUMMARY_COLUMNS}, {TAGS_SQL} FROM adapters a {where} ORDER BY a.name, a.version"
        return [row_to_entry(r) for r in self._tuples(sql, args)]

    def insert(self, conn: sqlite3.Connection, name: str, meta: dict[str, Any], files: list[FileRecord]) -> tuple[int, int]:
        """Return (row id, version) of a new version row with its files; call inside write()."""
        conn.execute("INSERT OR IGNORE INTO names (name) VALUES (?)", (name,))
        version = conn.execute("SELECT next_version FROM names WHERE name = ?", (name,)).fetchone()[0]
        conn.execute("UPDATE names SET next_version = ? WHERE name = ?", (version + 1, name))
        meta = dict(meta)
        detail = meta.pop("detail")
        cols = ["name", "version", *meta]
        cur = conn.execute(f"INSERT INTO adapters ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                           [name, version, *meta.values()])
        conn.execute("INSERT INTO details (adapter_id, detail) VALUES (?, ?)", (cur.lastrowid, detail))
        conn.executemany("INSERT INTO files (adapter_id, path, sha256, size) VALUES (?, ?, ?, ?)",
                         [(cur.lastrowid, f.path, f.sha256, f.size) for f in files])
        return cur.lastrowid, version

    def set_metrics(self, conn: sqlite3.Connection, adapter_id: int, metrics: dict[str, Any]) -> None:
        """Replace a version's metrics (its files and lineage stay as they were); call inside write()."""
        conn.execute("UPDATE adapters SET metrics = ? WHERE id = ?", (json.dumps(metrics), adapter_id))

    def set_tag(self, conn: sqlite3.Connection, name: str, tag: str, adapter_id: int, move: bool = True) -> None:
        """Point name:tag at a version (moving it from another version unless move=False); call inside write()."""
        verb = "REPLACE" if move else "IGNORE"
        conn.execute(f"INSERT OR {verb} INTO tags (name, tag, adapter_id) VALUES (?, ?, ?)", (name, tag, adapter_id))

    def drop_tag(self, conn: sqlite3.Connection, name: str, tag: str) -> None:
        """Delete name:tag (the version it named stays); call inside write()."""
        conn.execute("DELETE FROM tags WHERE name = ? AND tag = ?", (name, tag))

    def find_same_content(self, conn: sqlite3.Connection, name: str, content_sha256: str) -> int | None:
        """Return the row id of a version of name with exactly these files, or None."""
        row = conn.execute("SELECT id FROM adapters WHERE name = ? AND content_sha256 = ? ORDER BY version LIMIT 1",
                           (name, content_sha256)).fetchone()
        return row[0] if row else None

    def known_base(self, conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
        """Return (version, base_model, base_fingerprint) of name's latest version with a known base."""
        return conn.execute("SELECT version, base_model, base_fingerprint FROM adapters WHERE name = ? "
                            "AND base_fingerprint IS NOT NULL ORDER BY version DESC LIMIT 1", (name,)).fetchone()

    def version_ids(self, name: str) -> list[tuple[int, int]]:
        """Return [(row id, version)] of every version of a name."""
        return [tuple(r) for r in self.conn.execute("SELECT id, version FROM adapters WHERE name = ? ORDER BY version", (name,))]

    def all_files(self) -> list[tuple[str, FileRecord]]:
        """Return (name@version, file) for every stored file of every entry."""
        sql = "SELECT a.name, a.version, f.path, f.sha256, f.size FROM files f JOIN adapters a ON a.id = f.adapter_id ORDER BY a.name, a.version, f.path"
        return [(f"{r[0]}@{r[1]}", FileRecord(r[2], r[3], r[4])) for r in self.conn.execute(sql)]

    def referenced(self, conn: sqlite3.Connection) -> set[str]:
        """Return every sha256 some entry still uses."""
        return {r[0] for r in conn.execute("SELECT DISTINCT sha256 FROM files")}

    def refs(self) -> set[str]:
        """Return every name@version in the catalog."""
        return {f"{r[0]}@{r[1]}" for r in self.conn.execute("SELECT name, version FROM adapters")}

    def _missing(self, ref: Ref) -> str:
        versions = [r[1] for r in self.version_ids(ref.name)]
        if versions and ref.tag is not None:
            tags = [r[0] for r in self.conn.execute("SELECT tag FROM tags WHERE name = ? ORDER BY tag", (ref.name,))]
            return f"{ref.name} has no tag {ref.tag!r}; its tags: {', '.join(tags) or 'none'} (add one with `peftkit registry tag {ref.name}@{versions[-1]} {ref.tag}`)"
        if versions:
            return f"{ref} does not exist; versions of {ref.name}: {', '.join(map(str, versions))}"
        names = [r[0] for r in self.conn.execute("SELECT DISTINCT name FROM adapters")]
        if not names:
            return f"no adapter named {ref.name!r}: the registry at {self.path.parent} is empty; add one with `peftkit registry add DIR --name NAME`"
        close = difflib.get_close_matches(ref.name, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see `peftkit registry list`"
        return f"no adapter named {ref.name!r} in {self.path.parent}; {hint}"

    def _tuples(self, sql: str, args: tuple | list = ()) -> sqlite3.Cursor:
        # Plain tuples: row_to_entry reads by position, three times faster than sqlite3.Row by name.
        cur = self.conn.cursor()
        cur.row_factory = None
        return cur.execute(sql, args)

    def _set_wal(self) -> None:
        # Switching to WAL needs a moment of exclusive access; several processes opening a new
        # registry at once can see "locked" here, which the busy handler does not always cover.
        for attempt in range(100):
            try:
                self.conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise RegistryError(f"{self.path}: cannot open the catalog ({exc}); check the folder is writable") from None
                time.sleep(0.05)
        raise RegistryError(f"{self.path}: the catalog stayed locked for 5 s; another process holds it")


def row_to_entry(row: tuple) -> Entry:
    """Return a summary Entry from a (SUMMARY_COLUMNS..., tags) tuple."""
    # SUMMARY_COLUMNS lists id, then Entry's first fields in Entry's order (name ... registered_at), then metrics.
    return Entry(*row[1:15], metrics=json.loads(row[15]), tags=sorted(row[16].split(",")) if row[16] else [], id=row[0])


ENTRY_FIELDS = [f.name for f in fields(Entry) if f.name not in ("id", "files")]
