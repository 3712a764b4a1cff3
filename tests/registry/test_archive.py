"""Export to one archive and import it back: same files and metadata, duplicates reported, unsafe archives refused."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from peftkit.registry import ArchiveError, PickleRefusedError, Registry


def _manifest(tf: tarfile.TarFile) -> dict:
    return json.loads(tf.extractfile("peftkit-manifest.json").read())


def _rewrite(src, dst, edit_member=None, extra=()):
    """Copy an archive member by member, letting edit_member change (info, data) and appending extra members."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            m, data = edit_member(m, data) if edit_member else (m, data)
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
        for info, data in extra:
            tout.addfile(info, io.BytesIO(data) if data is not None else None)
    return dst


@pytest.fixture
def exported(reg, make_adapter, tmp_path):
    """Return (entry, archive path) for a registered adapter exported to a .tar."""
    entry = reg.add(make_adapter(extra_files={"README.md": "# card"}), "bot", tags=["stable"], domain="retail")
    return reg.show(entry.ref), reg.export("bot:stable", tmp_path / "bot.tar")


def test_export_writes_one_archive_with_a_manifest_and_every_file(exported):
    entry, path = exported
    with tarfile.open(path) as tf:
        names = tf.getnames()
        manifest = _manifest(tf)
    assert names == ["peftkit-manifest.json"] + [f"files/{f.path}" for f in entry.files]
    assert manifest["name"] == "bot" and manifest["version"] == 1 and manifest["tags"] == ["stable"]
    assert manifest["files"] == [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in entry.files]
    assert manifest["entry"]["metrics"] == entry.metrics and manifest["entry"]["base_fingerprint"] == entry.base_fingerprint


def test_import_into_another_registry_keeps_files_and_metadata(exported, tmp_path):
    entry, path = exported
    other = Registry(tmp_path / "other")
    got = other.import_(path)
    assert (got.ref, got.new, got.tags, got.domain) == ("bot@1", True, ["stable"], "retail")
    assert [(f.path, f.sha256) for f in got.files] == [(f.path, f.sha256) for f in entry.files]
    assert (got.base_fingerprint, got.data_fingerprint, got.metrics, got.config) == (
        entry.base_fingerprint, entry.data_fingerprint, entry.metrics, entry.config)
    assert got.lineage["imported_from"] == "bot@1"
    assert other.verify().ok


def test_importing_the_same_archive_twice_reports_the_duplicate(exported, reg, tmp_path):
    entry, path = exported
    again = reg.import_(path)
    assert (again.ref, again.new) == ("bot@1", False)
    assert [e.ref for e in reg.list()] == ["bot@1"]
    renamed = reg.import_(path, name="bot-copy")
    assert (renamed.ref, renamed.new) == ("bot-copy@1", True)


def test_gzip_archives_round_trip(reg, exported, tmp_path):
    path = reg.export("bot@1", tmp_path / "bot.tar.gz")
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert Registry(tmp_path / "gz").import_(path).ref == "bot@1"


def test_a_file_whose_hash_differs_from_the_manifest_is_refused(exported, tmp_path):
    _, path = exported

    def flip(m, data):
        if m.name.endswith(".safetensors"):
            data = data[:-1] + bytes([data[-1] ^ 1])
        return m, data

    bad = _rewrite(path, tmp_path / "bad.tar", flip)
    other = Registry(tmp_path / "other")
    with pytest.raises(ArchiveError, match="adapter_model.safetensors is corrupt .* nothing imported"):
        other.import_(bad)
    assert other.list() == [] and list(other.store.iter_blobs()) == []


def _evil(kind: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo({"absolute": "/tmp/peftkit-evil", "dotdot": "files/../../peftkit-evil",
                            "symlink": "files/link", "hardlink": "files/hard", "device": "files/dev",
                            "fifo": "files/fifo", "stray": "outside.txt"}[kind])
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "files/adapter_config.json"
    elif kind == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    elif kind == "fifo":
        info.type = tarfile.FIFOTYPE
    return info


@pytest.mark.parametrize("kind, words", [
    ("absolute", "absolute path"), ("dotdot", "climbs out with '..'"), ("symlink", "is a link"),
    ("hardlink", "is a link"), ("device", "device, pipe or other special file"), ("fifo", "device, pipe"),
    ("stray", "neither peftkit-manifest.json nor under files/"),
])
def test_unsafe_members_are_refused_before_anything_is_written(exported, tmp_path, kind, words):
    _, path = exported
    info = _evil(kind)
    payload = b"evil" if info.isfile() else None
    bad = _rewrite(path, tmp_path / f"{kind}.tar", extra=[(info, payload)])
    other = Registry(tmp_path / "other")
    with pytest.raises(ArchiveError, match=words):
        other.import_(bad)
    assert other.list() == [] and not (tmp_path / "other" / "tmp").exists()
    assert not (tmp_path.parent / "peftkit-evil").exists()


def test_unlisted_or_missing_files_are_refused(exported, tmp_path):
    _, path = exported
    extra = tarfile.TarInfo("files/extra.json")
    extra.size = 2
    with pytest.raises(ArchiveError, match="not listed: extra.json"):
        Registry(tmp_path / "a").import_(_rewrite(path, tmp_path / "x.tar", extra=[(extra, b"{}")]))

    def unlist(m, data):
        if m.name == "peftkit-manifest.json":
            doc = json.loads(data)
            doc["files"].append({"path": "gone.json", "sha256": "0" * 64, "size": 1})
            data = json.dumps(doc).encode()
        return m, data

    with pytest.raises(ArchiveError, match="missing: gone.json"):
        Registry(tmp_path / "b").import_(_rewrite(path, tmp_path / "y.tar", unlist))


def test_pickle_files_listed_in_an_archive_are_refused(exported, tmp_path):
    _, path = exported

    def rename(m, data):
        if m.name == "peftkit-manifest.json":
            doc = json.loads(data)
            doc["files"][0]["path"] = "adapter_model.bin"
            data = json.dumps(doc).encode()
        elif m.name == "files/README.md":
            m.name = "files/adapter_model.bin"
        return m, data

    with pytest.raises(PickleRefusedError, match="adapter_model.bin"):
        Registry(tmp_path / "a").import_(_rewrite(path, tmp_path / "p.tar", rename))


def test_not_an_archive_is_a_clear_error(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"hello")
    with pytest.raises(ArchiveError, match="not a tar archive"):
        Registry(tmp_path / "r").import_(tmp_path / "junk.tar")


def test_export_refuses_a_corrupt_store_and_leaves_no_file(reg, exported, tmp_path):
    entry, _ = exported
    blob = reg.store.blob_path(entry.files[1].sha256)
    blob.chmod(0o644)
    raw = blob.read_bytes()
    blob.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(ArchiveError, match="corrupt in the store; nothing exported"):
        reg.export("bot@1", tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists() and list(tmp_path.glob(".out*")) == []  # no temp file left
