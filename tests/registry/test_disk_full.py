"""A full disk and a network file system: one clear RegistryError, nothing half-written, the registry still works after."""
from __future__ import annotations

import errno
import os
import sqlite3
import tarfile

import pytest

from peftkit.cli import main
from peftkit.registry import Registry, RegistryError
from peftkit.registry import archive as archive_module
from peftkit.registry import store as store_module
from peftkit.registry.catalog import Catalog

def _full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_db(*_args, **_kwargs):
    raise sqlite3.OperationalError("database or disk is full")


class _FullDisk:
    """open() for the store module that lets `limit` bytes through and then fails as a full disk does."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, path, mode="r", *args, **kwargs):
        fh = open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return fh
        limit, write = self, fh.write

        def full_write(data):
            if len(data) > limit.limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            limit.limit -= len(data)
            return write(data)
        fh.write = full_write
        return fh


def _nth(real, n: int):
    """Return real() that fails as a full disk on its n-th call (1-based)."""
    calls = []

    def call(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    return call


class _FullAtCommit:
    """The catalog connection, except that COMMIT finds the disk full (SQLite then keeps the transaction open)."""

    def __init__(self, conn):
        self._conn = conn

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def execute(self, sql, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)


def _assert_clean_after_gc(reg: Registry) -> None:
    assert reg.list() == []
    reg.gc()
    assert list(reg.store.iter_blobs()) == []
    assert not reg.store.tmp.exists() or list(reg.store.tmp.iterdir()) == []


@pytest.mark.parametrize("where", ["staging a file", "renaming the second blob", "flushing the blob folder",
                                   "inserting the catalog row", "committing the catalog"])
def test_a_full_disk_during_add_is_one_clear_error_and_leaves_nothing(reg, make_adapter, monkeypatch, where):
    folder = make_adapter()
    with monkeypatch.context() as m:
        if where == "staging a file":
            m.setattr(store_module, "open", _FullDisk(limit=2000), raising=False)
        elif where == "renaming the second blob":
            m.setattr(os, "replace", _nth(os.replace, 2))
        elif where == "flushing the blob folder":
            m.setattr(store_module, "fsync_dir", _full)
        elif where == "inserting the catalog row":
            m.setattr(Catalog, "insert", _full_db)
        else:
            m.setattr(reg.catalog, "conn", _FullAtCommit(reg.catalog.conn))
        with pytest.raises(RegistryError) as err:
            reg.add(folder, "bot", tags=["stable"])
    message = str(err.value)
    assert message.startswith(f"no space left on the disk while adding {folder} as bot: nothing was registered")
    assert f"df -h {reg.path}" in message and "run the same command again" in message
    if where != "committing the catalog":  # there even the clean-up's commit failed: gc frees the blobs
        assert list(reg.store.iter_blobs()) == []
    _assert_clean_after_gc(reg)
    assert reg.add(folder, "bot", tags=["stable"]).ref == "bot@1"  # version 1: the failed add took no number
    assert reg.verify().ok


def test_a_full_disk_during_import_leaves_nothing(reg, make_adapter, tmp_path, monkeypatch):
    reg.add(make_adapter(), "bot")
    archive = reg.export("bot@1", tmp_path / "bot.tar")
    other = Registry(tmp_path / "other")
    with monkeypatch.context() as m:
        m.setattr(os, "replace", _nth(os.replace, 1))
        with pytest.raises(RegistryError, match=f"no space left on the disk while importing {archive}: nothing was registered"):
            other.import_(archive)
    _assert_clean_after_gc(other)
    assert other.import_(archive).ref == "bot@1"


def test_a_full_disk_during_export_writes_no_archive(reg, make_adapter, tmp_path, monkeypatch):
    reg.add(make_adapter(), "bot")
    with monkeypatch.context() as m:
        m.setattr(archive_module.tarfile.TarFile, "addfile", _nth(tarfile.TarFile.addfile, 2))
        with pytest.raises(RegistryError, match=f"while exporting bot@1 to {tmp_path / 'bot.tar'}: no archive was written"):
            reg.export("bot@1", tmp_path / "bot.tar")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".bot", "bot"))) == []
    assert reg.export("bot@1", tmp_path / "bot.tar").is_file()


def test_a_full_disk_during_checkout_leaves_no_folder(reg, make_adapter, monkeypatch):
    reg.add(make_adapter(), "bot")
    with monkeypatch.context() as m:
        m.setattr(os, "link", _full)
        m.setattr(store_module.shutil, "copyfile", _full)
        with pytest.raises(RegistryError, match="while checking out bot@1: no checkout folder was written"):
            reg.checkout("bot@1")
    assert not (reg.store.checkouts / "bot@1").exists() and list(reg.store.tmp.iterdir()) == []
    assert (reg.checkout("bot@1") / "adapter_model.safetensors").is_file()


def test_a_full_catalog_during_tag_changes_nothing(reg, make_adapter, monkeypatch):
    reg.add(make_adapter(), "bot", tags=["stable"])
    with monkeypatch.context() as m:
        m.setattr(Catalog, "set_tag", _full_db)
        with pytest.raises(RegistryError, match="while tagging bot@1 as live: the tag was not changed"):
            reg.tag("bot@1", "live")
    assert reg.show("bot@1").tags == ["stable"]


def test_the_cli_prints_one_line_for_a_full_disk(make_adapter, tmp_path, monkeypatch, capsys):
    folder = make_adapter()
    monkeypatch.setattr(Catalog, "insert", _full_db)
    assert main(["registry", "add", str(folder), "--name", "bot", "--registry", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on the disk while adding") and err.count("\n") == 1
    assert "Traceback" not in err


# ---------------------------------------------------------------- network file systems

@pytest.fixture
def mounts(tmp_path, monkeypatch):
    """Return write(lines): make the registry read these lines as its mount table."""
    table = tmp_path / "mounts"

    def write(*lines: str):
        table.write_text("/dev/sda1 / ext4 rw,relatime 0 0\n" + "".join(line + "\n" for line in lines))
    monkeypatch.setattr("peftkit.registry.mounts.MOUNTS", table)
    monkeypatch.delenv("PEFTKIT_REGISTRY_ALLOW_NETWORK_FS", raising=False)
    write()
    return write


@pytest.mark.parametrize("fstype", ["nfs", "nfs4", "cifs", "smb3", "fuse.sshfs", "9p"])
def test_a_registry_on_a_network_file_system_is_refused_with_the_override(tmp_path, mounts, fstype):
    share = tmp_path / "share with space"
    share.mkdir()
    mounts(f"server:/export {str(share).replace(' ', chr(92) + '040')} {fstype} rw 0 0")
    with pytest.raises(RegistryError) as err:
        Registry(share / "registry")
    message = str(err.value)
    assert f"the registry folder {share / 'registry'} is on a network file system ({fstype} mounted at {share})" in message
    assert "write-ahead logging" in message and "PEFTKIT_REGISTRY_ALLOW_NETWORK_FS=1" in message
    assert not (share / "registry").exists()  # refused before anything was created
    Registry(share / "registry", allow_network_fs=True).close()


def test_the_environment_variable_allows_a_network_registry(tmp_path, mounts, monkeypatch, capsys):
    mounts(f"server:/export {tmp_path} nfs4 rw 0 0")
    assert main(["registry", "list", "--registry", str(tmp_path / "r")]) == 2
    assert "network file system (nfs4" in capsys.readouterr().err
    assert main(["registry", "list", "--registry", str(tmp_path / "r"), "--allow-network-fs"]) == 0
    monkeypatch.setenv("PEFTKIT_REGISTRY_ALLOW_NETWORK_FS", "1")
    Registry(tmp_path / "r").close()


def test_a_local_mount_under_a_network_one_is_fine(tmp_path, mounts):
    local = tmp_path / "local"
    local.mkdir()
    mounts(f"server:/export {tmp_path} nfs rw 0 0", f"/dev/sdb1 {local} ext4 rw 0 0")
    Registry(local / "registry").close()
    with pytest.raises(RegistryError, match="network file system"):
        Registry(tmp_path / "registry")
