"""Refuse a registry on a network file system, where SQLite's write-ahead log can corrupt the catalog.

WAL mode keeps readers and writers apart through a shared-memory file and POSIX locks; over NFS, SMB,
sshfs or 9p neither is shared reliably between machines (https://sqlite.org/wal.html, "WAL does not
work over a network filesystem"). The check reads /proc/mounts, so it runs on Linux only; a folder
that only one machine ever uses may set PEFTKIT_REGISTRY_ALLOW_NETWORK_FS=1 (or allow_network_fs=True).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from peftkit.registry.errors import RegistryError

ALLOW_ENV = "PEFTKIT_REGISTRY_ALLOW_NETWORK_FS"
MOUNTS = Path("/proc/mounts")
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ncpfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
    "fuse.sshfs", "sshfs", "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.juicefs",
    "fuse.davfs2", "davfs", "fuse.smbnetfs",
})


def check_local(folder: Path, allow: bool = False) -> None:
    """Raise RegistryError when folder lives on a network file system, unless allowed by argument or environment."""
    if allow or os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes"):
        return
    try:
        table = MOUNTS.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return  # no mount table (not Linux): nothing to check
    found = mount_of(_existing(folder), table)
    if found is None or found[1] not in NETWORK_FS:
        return
    point, fstype = found
    raise RegistryError(
        f"the registry folder {folder} is on a network file system ({fstype} mounted at {point}); its SQLite catalog "
        "uses write-ahead logging, which can corrupt the catalog there because file locks and shared memory are not "
        f"reliable across machines. Put the registry on a local disk (--registry DIR or PEFTKIT_HOME), or set {ALLOW_ENV}=1 "
        "(allow_network_fs=True) if only one machine at a time ever uses it")


def mount_of(path: Path, table: str) -> tuple[str, str] | None:
    """Return (mount point, file system type) of the mount holding path, read from /proc/mounts text."""
    best: tuple[str, str] | None = None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        inside = path == Path(point) or Path(point) in path.parents
        # The longest matching mount point wins; among equals the later line (a mount on top of another).
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fields[2])
    return best


def _existing(folder: Path) -> Path:
    """Return the folder, or its nearest existing parent, with links resolved (a new registry has no folder yet)."""
    path = folder.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.resolve()


def _unescape(field: str) -> str:
    # /proc/mounts writes a space in a path as \040, a tab as \011, and so on.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)
