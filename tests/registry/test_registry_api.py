"""The Registry API: add, versions, references, tags, remove, list filters, base checks, lineage, checkout."""
from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest

from registry_fakes import BASE_FP, LLAMA, OTHER_FP
from peftkit.fingerprint import base_fingerprint
from peftkit.registry import BaseMismatchError, Registry, RegistryError, UnknownRefError


def test_add_records_lineage_base_data_config_metrics_and_files(reg, make_adapter):
    entry = reg.add(make_adapter(seed=7), "retail-bot", tags=["stable"], domain="retail")
    assert (entry.ref, entry.method, entry.peft_type, entry.rank) == ("retail-bot@1", "lora", "LORA", 8)
    assert (entry.base_model, entry.base_fingerprint) == ("tiny-llama", BASE_FP)
    assert entry.data_fingerprint == f"sha256:{7:064x}"
    assert entry.config == {"method": {"name": "lora", "rank": 8}} and entry.base_config == LLAMA
    assert entry.metrics == {"eval_loss": 1.25, "train_loss": 1.5}
    assert (entry.tags, entry.domain, entry.created_at) == (["stable"], "retail", "2025-01-02T03:04:05+00:00")
    assert [f.path for f in entry.files] == ["adapter_config.json", "adapter_model.safetensors", "peftkit.json"]
    assert entry.size == sum(f.size for f in entry.files) > 0
    assert reg.show("retail-bot").to_dict()["ref"] == "retail-bot@1"


def test_a_training_run_folder_stores_only_the_adapter_and_reads_config_and_metrics(reg, make_run):
    entry = reg.add(make_run(), "from-run")
    assert [f.path for f in entry.files] == ["adapter_config.json", "adapter_model.safetensors"]
    assert entry.metrics == {"eval_loss": 0.75}
    assert entry.config["method"] == {"name": "lora", "rank": 8}
    assert entry.base_fingerprint is None  # no peftkit.json: base unknown, stored anyway


def test_a_run_folder_written_by_training_takes_lineage_from_peftkit_json(reg, make_run):
    entry = reg.add(make_run(lineage=True), "trained")
    assert "peftkit.json" in [f.path for f in entry.files]
    assert (entry.base_fingerprint, entry.metrics["eval_loss"]) == (BASE_FP, 1.25)  # lineage wins over metrics.json


def test_versions_increment_and_references_resolve(reg, make_adapter):
    refs = [reg.add(make_adapter(), "bot").ref for _ in range(3)]
    assert refs == ["bot@1", "bot@2", "bot@3"]
    reg.tag("bot@2", "stable")
    assert reg.show("bot").version == 3
    assert reg.show("bot@1").version == 1
    assert reg.show("bot:stable").version == 2
    assert reg.show("bot:stable").tags == ["stable"]


def test_adding_the_same_files_again_returns_the_existing_version(reg, make_adapter):
    folder = make_adapter()
    first = reg.add(folder, "bot")
    again = reg.add(folder, "bot", tags=["prod"])
    assert (again.ref, again.new, first.new) == ("bot@1", False, True)
    assert reg.show("bot:prod").ref == "bot@1"
    assert [e.ref for e in reg.list()] == ["bot@1"]
    assert reg.add(folder, "other-name").ref == "other-name@1"  # same files, another name: a new entry


def test_unknown_references_list_close_names_versions_and_tags(reg, make_adapter):
    with pytest.raises(UnknownRefError, match="registry at .* is empty"):
        reg.show("nothing")
    reg.add(make_adapter(), "retail-bot")
    reg.add(make_adapter(), "retail-bot")
    with pytest.raises(UnknownRefError, match="did you mean retail-bot"):
        reg.show("retail-bott")
    with pytest.raises(UnknownRefError, match="retail-bot@9 does not exist; versions of retail-bot: 1, 2"):
        reg.show("retail-bot@9")
    with pytest.raises(UnknownRefError, match="retail-bot has no tag 'stable'; its tags: none"):
        reg.show("retail-bot:stable")


def test_a_tag_moves_to_the_version_it_is_given(reg, make_adapter):
    reg.add(make_adapter(), "bot", tags=["stable"])
    reg.add(make_adapter(), "bot", tags=["stable"])
    assert reg.show("bot:stable").ref == "bot@2"
    reg.tag("bot@1", "stable")
    assert reg.show("bot:stable").ref == "bot@1"
    assert reg.show("bot@2").tags == []


def test_remove_one_version_never_reuses_its_number(reg, make_adapter):
    for _ in range(2):
        reg.add(make_adapter(), "bot")
    with pytest.raises(RegistryError, match="bot has versions 1, 2; remove one with bot@2 or all of them with --all"):
        reg.remove("bot")
    assert reg.remove("bot@2") == ["bot@2"]
    assert reg.add(make_adapter(), "bot").ref == "bot@3"
    assert reg.remove("bot", all_versions=True) == ["bot@1", "bot@3"]
    assert reg.list() == [] and list(reg.store.iter_blobs()) == []  # freed: no other entry used them


def test_remove_keeps_blobs_other_entries_share(reg, make_adapter):
    folder = make_adapter()
    reg.add(folder, "a")
    reg.add(folder, "b")
    reg.remove("a")
    assert reg.verify().ok and len(list(reg.store.iter_blobs())) == 3


def test_list_filters_by_domain_base_and_latest(reg, make_adapter):
    reg.add(make_adapter(), "a", domain="retail")
    reg.add(make_adapter(), "a", domain="retail")
    reg.add(make_adapter(lineage={"base_model": "other-base", "base_fingerprint": OTHER_FP}), "b", domain="legal")
    assert [e.ref for e in reg.list()] == ["a@1", "a@2", "b@1"]
    assert [e.ref for e in reg.list(domain="legal")] == ["b@1"]
    assert [e.ref for e in reg.list(base="other-base")] == ["b@1"]
    assert [e.ref for e in reg.list(base=BASE_FP[:15])] == ["a@1", "a@2"]
    assert [e.ref for e in reg.list(latest=True)] == ["a@2", "b@1"]
    assert reg.list()[0].files == [] and reg.list()[0].config is None  # summaries only


def test_a_new_version_on_another_base_is_refused_unless_allowed(reg, make_adapter):
    reg.add(make_adapter(), "bot")
    other = make_adapter(lineage={"base_model": "llama-3.1-8b", "base_fingerprint": OTHER_FP})
    with pytest.raises(BaseMismatchError, match="bot@1 was trained on base sha256:abababab.*llama-3.1-8b.*--allow-base-mismatch"):
        reg.add(other, "bot")
    assert reg.add(other, "bot", allow_base_mismatch=True).base_fingerprint == OTHER_FP


def test_base_model_folder_records_its_fingerprint_and_must_match_the_lineage(reg, make_adapter, base_dir):
    fp = base_fingerprint(base_dir)
    entry = reg.add(make_adapter(lineage=False), "bot", base_model_dir=base_dir)
    assert (entry.base_fingerprint, entry.base_model, entry.base_config) == (fp, "base", LLAMA)
    with pytest.raises(BaseMismatchError, match="trained on base sha256:abababab"):
        reg.add(make_adapter(), "other", base_model_dir=base_dir)  # peftkit.json says BASE_FP


def test_parent_is_recorded_from_a_reference_or_the_folder_training_started_from(reg, make_adapter):
    first_folder = make_adapter()
    reg.add(first_folder, "bot")
    assert reg.add(make_adapter(), "bot", parent="bot@1").parent == "bot@1"
    assert reg.add(make_adapter(lineage={"parent": "bot@1"}), "bot").parent == "bot@1"
    assert reg.add(make_adapter(), "child", parent=first_folder).parent == "bot@1"
    assert reg.add(make_adapter(lineage={"parent": str(first_folder)}), "child").parent == "bot@1"
    with pytest.raises(UnknownRefError, match="parent bot@9: .*register the parent first"):
        reg.add(make_adapter(), "bot", parent="bot@9")


def test_a_parent_only_recorded_in_the_lineage_is_kept_as_text_when_unknown(reg, make_adapter, tmp_path):
    # Training writes method.init_from into peftkit.json; an unregistered parent must not refuse the run.
    entry = reg.add(make_adapter(lineage={"parent": str(tmp_path / "elsewhere" / "adapter")}), "bot")
    assert entry.parent == str(tmp_path / "elsewhere" / "adapter")
    assert reg.add(make_adapter(lineage={"parent": "gone@3"}), "bot").parent == "gone@3"
    with pytest.raises(UnknownRefError, match="matches no registered adapter"):
        reg.add(make_adapter(), "bot", parent=tmp_path / "elsewhere")


def test_checkout_is_a_read_only_folder_with_the_exact_files(reg, make_adapter):
    folder = make_adapter(extra_files={"README.md": "# card", "tokenizer.json": "{}"})
    entry = reg.add(folder, "bot")
    path = reg.checkout("bot")
    assert path.name == "bot@1" and reg.checkout("bot@1") == path
    for f in entry.files:
        assert (path / f.path).read_bytes() == (folder / f.path).read_bytes()
        assert not (path / f.path).stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert not path.stat().st_mode & stat.S_IWUSR
    reg.remove("bot")
    assert not path.exists()


def test_registry_defaults_to_peftkit_home(tmp_path, monkeypatch, make_adapter):
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))
    reg = Registry()
    reg.add(make_adapter(), "bot")
    assert reg.path == tmp_path / "home" / "registry" and (reg.path / "catalog.db").is_file()


def test_catalog_is_wal_with_foreign_keys(reg):
    conn = reg.catalog.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_import_list_and_show_never_import_torch(reg, make_adapter):
    reg.add(make_adapter(), "bot")
    code = ("import sys; from peftkit.registry import Registry; r = Registry(sys.argv[1]); r.list(); r.show('bot'); "
            "from peftkit.cli import main; main(['registry', 'list', '--registry', sys.argv[1]]); "
            "main(['registry', 'show', 'bot', '--registry', sys.argv[1]]); "
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'peft', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(reg.path)], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out and "bot@1" in out


def test_show_returns_plain_json_ready_data(reg, make_adapter):
    data = reg.add(make_adapter(), "bot").to_dict()
    assert json.loads(json.dumps(data))["ref"] == "bot@1" and "id" not in data


def _blob(reg, entry, path):
    blob = reg.store.blob_path(next(f.sha256 for f in entry.files if f.path == path))
    blob.chmod(0o644)
    return blob


def test_verify_names_each_missing_truncated_or_corrupt_file_and_re_adding_repairs(reg, make_adapter):
    folder = make_adapter()
    a = reg.add(folder, "a")
    b = reg.add(make_adapter(), "b")
    reg.checkout("a@1")
    _blob(reg, a, "peftkit.json").unlink()
    weights = _blob(reg, a, "adapter_model.safetensors")
    weights.write_bytes(weights.read_bytes()[:-10])
    raw = bytearray(_blob(reg, b, "adapter_model.safetensors").read_bytes())
    raw[200] ^= 0x01
    _blob(reg, b, "adapter_model.safetensors").write_bytes(bytes(raw))
    report = reg.verify()
    assert not report.ok
    assert sorted((p.ref, p.path, p.kind) for p in report.problems) == [
        ("a@1", "adapter_model.safetensors", "truncated"), ("a@1", "peftkit.json", "missing"),
        ("b@1", "adapter_model.safetensors", "corrupt")]
    assert [p.kind for p in reg.verify("b").problems] == ["corrupt"]  # one entry only
    again = reg.add(folder, "a")
    assert not again.new and [p.ref for p in reg.verify().problems] == ["b@1"]
    checkout = reg.checkout("a@1")  # rebuilt from the repaired blobs
    assert (checkout / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()


def test_gc_frees_blobs_left_unused_and_stale_checkouts(reg, make_adapter):
    entry = reg.add(make_adapter(), "a")
    reg.checkout("a")
    with reg.catalog.write() as conn:  # as if a crash came between deleting the row and freeing its files
        conn.execute("DELETE FROM adapters")
    report = reg.gc()
    assert (report.blobs_removed, report.checkouts_removed) == (3, 1)
    assert report.bytes_freed == entry.size and list(reg.store.iter_blobs()) == []
