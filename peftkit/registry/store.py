"""Content-addressed file store: every file kept once under its sha256, written so a crash leaves no half file.

Layout under the registry folder:
    blobs/sha256/ab/abcdef...   read-only files named by their sha256
    tmp/<pid>-<random>.part     files being written (the pid lets gc tell a live writer from a dead one)
    checkouts/<name>@<version>/ read-only folders of hard links (copies across file systems) for loading
A blob appears only by rename() of a fully written, fsynced temp file, so a blob path never holds
a partial file. Blobs are deleted only while the catalog's write lock is held (see Registry.gc).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from peftkit.atomic import fsync_dir
from peftkit.registry.errors import RegistryError

CHUNK = 1 << 20
STALE_TEMP_SECONDS = 24 * 3600  # a temp file this old is garbage even if its pid is in use again


@dataclass
class Staged:
    """A file written and fsynced into tmp/, waiting to be renamed to its blob path."""

    tmp: Path
    sha256: str
    size: int


class Store:
    """The blob store under one registry folder."""

    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.tmp = root / "tmp"
        self.checkouts = root / "checkouts"

    def blob_path(self, sha256: str) -> Path:
        """Return where the blob with this sha256 lives (whether or not it exists)."""
        return self.blobs / sha256[:2] / sha256

    def stage_file(self, src: Path) -> Staged:
        """Return a Staged copy of a file, hashed while copying so the hash matches the stored bytes."""
        try:
            f = open(src, "rb")
        except OSError as exc:
            raise RegistryError(f"{src}: cannot be read ({exc.strerror}); check that it exists and that you may read it") from None
        with f:
            return self.stage_stream(f)

    def stage_stream(self, stream: BinaryIO) -> Staged:
        """Return a Staged copy of everything a binary stream yields."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex}.part"
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                while block := stream.read(CHUNK):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Staged(tmp, digest.hexdigest(), size)

    def commit(self, staged: list[Staged]) -> list[Path]:
        """Return the blob paths that did not exist before, after renaming staged files to their blob paths
        (replacing any old copy) and making the renames durable; a failure removes the blobs it created."""
        parents, created = set(), []
        try:
            for s in staged:
                final = self.blob_path(s.sha256)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(s.tmp, 0o444)  # blobs are immutable; checkouts hard-link them
                if not final.exists():
                    created.append(final)
                # Replacing an existing blob with freshly verified bytes also repairs a corrupted one.
                os.replace(s.tmp, final)
                parents.add(final.parent)
            for parent in parents:
                fsync_dir(parent)
        except BaseException:
            self.forget(created)
            raise
        return created

    def forget(self, blobs: list[Path]) -> None:
        """Delete blobs this process just created for a version that was then not registered."""
        # Only under the catalog's write lock: no other writer can have come to use them meanwhile.
        for path in blobs:
            path.unlink(missing_ok=True)

    def discard(self, staged: list[Staged]) -> None:
        """Delete staged temp files that were not committed."""
        for s in staged:
            s.tmp.unlink(missing_ok=True)

    def hash_blob(self, sha256: str) -> tuple[str, int] | None:
        """Return (actual sha256, size) of a stored blob, or None when it is missing."""
        try:
            with open(self.blob_path(sha256), "rb") as f:
                digest, size = hashlib.sha256(), 0
                while block := f.read(CHUNK):
                    digest.update(block)
                    size += len(block)
        except FileNotFoundError:
            return None
        return digest.hexdigest(), size

    def iter_blobs(self) -> Iterator[tuple[str, Path]]:
        """Yield (sha256, path) for every blob on disk."""
        if not self.blobs.is_dir():
            return
        for sub in sorted(self.blobs.iterdir()):
            if sub.is_dir():
                for path in sorted(sub.iterdir()):
                    yield path.name, path

    def delete_blob(self, path: Path) -> int:
        """Delete one blob and return the bytes freed."""
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def stale_temps(self) -> list[Path]:
        """Return temp files and folders whose writer is dead (or that are older than a day)."""
        if not self.tmp.is_dir():
            return []
        return [p for p in sorted(self.tmp.iterdir()) if _is_stale(p, time.time())]

    def checkout(self, dirname: str, files: list[tuple[str, str]]) -> Path:
        """Return a read-only folder holding these (relative path, sha256) files, building it once."""
        final = self.checkouts / dirname
        if final.is_dir():
            return final
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.checkouts.mkdir(parents=True, exist_ok=True)
        build = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex}.checkout"
        try:
            for relpath, sha in files:
                self._place(self.blob_path(sha), build / relpath, relpath)
            os.rename(build, final)
        except OSError:
            remove_tree(build)
            if not final.is_dir():  # another process did not win the race: a real failure
                raise
        _make_read_only(final)
        return final

    def iter_checkouts(self) -> Iterator[Path]:
        """Yield every checkout folder."""
        if self.checkouts.is_dir():
            yield from sorted(p for p in self.checkouts.iterdir() if p.is_dir())

    def _place(self, blob: Path, dest: Path, relpath: str) -> None:
        if not blob.is_file():
            raise RegistryError(f"{relpath}: its blob {blob.name[:12]} is missing from the store; run `peftkit registry verify`")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(blob, dest)
        except OSError:  # another file system, or links not allowed: copy instead
            shutil.copyfile(blob, dest)
            os.chmod(dest, 0o444)


def remove_tree(path: Path) -> None:
    """Delete a file or folder tree, read-only folders included."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    for dirpath, dirnames, _ in os.walk(path):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(path, ignore_errors=True)


def _make_read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        os.chmod(dirpath, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def _is_stale(path: Path, now: float) -> bool:
    if not _pid_alive(path.name.split("-", 1)[0]):
        return True
    try:
        return now - path.lstat().st_mtime > STALE_TEMP_SECONDS
    except FileNotFoundError:  # a live writer just renamed it into place
        return False


def _pid_alive(text: str) -> bool:
    if not text.isdigit():
        return False
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
