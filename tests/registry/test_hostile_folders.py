"""Hostile or inconsistent adapter folders at `registry add`: links out, stray files, configs that lie about their tensors."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest

from peftkit.cli import main
from peftkit.registry import AdapterValidationError
from registry_fakes import LLAMA, lora_tensors, make_lineage, write_adapter


def _assert_nothing_added(reg):
    assert reg.list() == []
    assert list(reg.store.iter_blobs()) == []
    assert not reg.store.tmp.exists() or list(reg.store.tmp.iterdir()) == []


# ---------------------------------------------------------------- symbolic links and extra files

def test_a_link_out_of_the_folder_is_refused_naming_link_and_target(reg, make_adapter, tmp_path):
    secret = tmp_path / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_text("aws_secret_access_key = SECRET")
    folder = make_adapter()
    os.symlink(secret, folder / "notes.txt")
    with pytest.raises(AdapterValidationError) as err:
        reg.add(folder, "x", include_extra=True)
    message = str(err.value)
    assert f"{folder / 'notes.txt'} is a symbolic link to {secret}, outside the adapter folder" in message
    assert "remove the link" in message
    with pytest.raises(AdapterValidationError, match="outside the adapter folder"):
        reg.add(folder, "x")  # refused whether or not the file would be stored
    _assert_nothing_added(reg)


def test_a_linked_adapter_file_out_of_the_folder_is_refused_and_never_exported(reg, make_adapter, tmp_path):
    elsewhere = make_adapter()
    folder = make_adapter()
    (folder / "README.md").unlink(missing_ok=True)
    os.symlink(elsewhere / "adapter_config.json", folder / "README.md")
    with pytest.raises(AdapterValidationError, match="README.md is a symbolic link to .*outside the adapter folder"):
        reg.add(folder, "x")
    (folder / "README.md").unlink()
    reg.add(folder, "x")
    with tarfile.open(reg.export("x@1", tmp_path / "x.tar")) as tf:
        assert sorted(tf.getnames()) == ["files/adapter_config.json", "files/adapter_model.safetensors",
                                         "files/peftkit.json", "peftkit-manifest.json"]


def test_a_link_that_loops_is_refused(reg, make_adapter):
    folder = make_adapter()
    os.symlink(folder / "loop.txt", folder / "loop.txt")
    with pytest.raises(AdapterValidationError, match="loop.txt is a symbolic link that loops back on itself"):
        reg.add(folder, "x")


def test_hugging_face_cache_snapshot_links_are_followed(reg, tmp_path):
    # models--org--name/snapshots/<rev>/adapter_model.safetensors -> ../../blobs/<sha>, as huggingface_hub writes them.
    repo = tmp_path / "hub" / "models--org--bot"
    made = write_adapter(tmp_path / "made")
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in made.iterdir():
        (repo / "blobs" / f"blob-{f.name}").write_bytes(f.read_bytes())
        os.symlink(f"../../blobs/blob-{f.name}", snapshot / f.name)
    entry = reg.add(snapshot, "hub-bot")
    assert sorted(f.path for f in entry.files) == ["adapter_config.json", "adapter_model.safetensors", "peftkit.json"]


def test_files_an_adapter_does_not_need_are_left_out_unless_asked(reg, make_adapter):
    folder = make_adapter(extra_files={"notes.txt": "mine", "train.log": "loss 1.2", "tokenizer.json": "{}",
                                       "README.md": "# card", "weird name.txt": "x"})
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "state.json").write_text("{}")
    entry = reg.add(folder, "x")
    assert sorted(f.path for f in entry.files) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                   "peftkit.json", "tokenizer.json"]
    assert entry.left_out == ["checkpoint-10/state.json", "notes.txt", "train.log", "weird name.txt"]
    (folder / "weird name.txt").unlink()  # a name the store refuses: asking for extras makes it an error
    full = reg.add(folder, "y", include_extra=True)
    assert {"notes.txt", "train.log", "checkpoint-10/state.json"} <= {f.path for f in full.files} and full.left_out == []


def test_cli_says_which_files_were_left_out_and_how_to_store_them(make_adapter, tmp_path, capsys):
    folder = make_adapter(extra_files={"notes.txt": "mine"})
    assert main(["registry", "add", str(folder), "--name", "x", "--registry", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "not stored, as an adapter does not need them: notes.txt; pass --include-extra-files to store them" in err
    assert main(["registry", "add", str(folder), "--name", "y", "--include-extra-files", "--registry", str(tmp_path / "r")]) == 0
    assert "not stored" not in capsys.readouterr().err
    assert main(["registry", "show", "y", "--json", "--registry", str(tmp_path / "r")]) == 0
    assert "notes.txt" in [f["path"] for f in json.loads(capsys.readouterr().out)["files"]]


# ---------------------------------------------------------------- adapter_config.json against the tensors

def test_config_rank_and_targets_that_do_not_match_the_tensors_are_refused(reg, make_adapter):
    # The example: r=16 on q and v, but rank-4 tensors on q only.
    folder = make_adapter(tensors=lora_tensors(rank=4, modules=("q_proj",)), adapter_config={"r": 16})
    with pytest.raises(AdapterValidationError) as err:
        reg.add(folder, "x")
    message = str(err.value)
    assert message.startswith("adapter_config.json: ")
    assert "r=16 but adapter_model.safetensors has rank 4 for q_proj in layers 0-1" in message and "set r to 4" in message
    assert "target_modules=['q_proj', 'v_proj'] targets v_proj in layers 0-1, but adapter_model.safetensors has no tensors there" in message
    _assert_nothing_added(reg)


def test_tensors_on_a_module_the_config_does_not_target_are_refused(reg, make_adapter):
    folder = make_adapter(tensors=lora_tensors(modules=("q_proj", "k_proj", "v_proj")))
    with pytest.raises(AdapterValidationError, match=r"target_modules=\['q_proj', 'v_proj'\] does not target k_proj in "
                                                     r"layers 0-1, but adapter_model.safetensors has tensors there; add it"):
        reg.add(folder, "x")


@pytest.mark.parametrize("config, error", [
    ({"peft_type": None}, "adapter_config.json: peft_type is missing; set it to the adapter's type, one of LORA (lora, dora, qlora)"),
    ({"peft_type": "LOHA"}, "adapter_config.json: peft_type='LOHA' is not a method peftkit can serve; supported: LORA"),
    ({"peft_type": "lora"}, "adapter_config.json: peft_type='lora' must be written 'LORA'"),
    ({"r": "16"}, "adapter_config.json: r must be a whole number above 0, e.g. 16, got '16'; fix r"),
    ({"r": 0}, "adapter_config.json: r must be a whole number above 0"),
    ({"target_modules": [1, 2]}, "adapter_config.json: target_modules must be a list of module names"),
    ({"target_modules": "(q_proj"}, "adapter_config.json: target_modules holds '(q_proj', which is not a valid regular expression"),
    ({"rank_pattern": {"q_proj": "4"}}, "adapter_config.json: rank_pattern must be an object of module pattern -> rank"),
    ({"lora_alpha": "x"}, "adapter_config.json: lora_alpha must be a number"),
])
def test_missing_unsupported_or_mistyped_config_fields_are_refused(reg, make_adapter, config, error):
    folder = make_adapter(lineage=False)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({k: v for k, v in {**json.loads(path.read_text()), **config}.items() if v is not None}))
    with pytest.raises(AdapterValidationError) as err:
        reg.add(folder, "x")
    assert str(err.value).startswith(error)
    _assert_nothing_added(reg)


def test_rank_pattern_layers_and_regex_targets_are_read_as_peft_reads_them(reg, make_adapter):
    tensors = lora_tensors(rank=8, modules=("q_proj",))
    tensors.update({k: v for k, v in lora_tensors(rank=4, modules=("v_proj",)).items()})
    ok = make_adapter(tensors=tensors, adapter_config={"rank_pattern": {"v_proj": 4}})
    assert reg.add(ok, "a").rank == 8
    wrong = make_adapter(tensors=tensors, adapter_config={"rank_pattern": {"v_proj": 2}})
    with pytest.raises(AdapterValidationError, match=r"rank_pattern\['v_proj'\]=2 but adapter_model.safetensors has rank 4 for v_proj"):
        reg.add(wrong, "b")
    one_layer = {k: v for k, v in lora_tensors().items() if ".layers.1." not in k}
    assert reg.add(make_adapter(tensors=one_layer, adapter_config={"layers_to_transform": [0]}), "c")
    with pytest.raises(AdapterValidationError, match="targets q_proj in layer 1, but adapter_model.safetensors has no tensors"):
        reg.add(make_adapter(tensors=one_layer), "d")
    assert reg.add(make_adapter(adapter_config={"target_modules": r".*\.(q|v)_proj"}), "e")
    excluded = make_adapter(adapter_config={"target_modules": ["q_proj", "v_proj", "k_proj"], "exclude_modules": ["k_proj"]})
    assert reg.add(excluded, "f")


def test_a_lineage_method_that_is_not_what_the_files_are_is_refused(reg, make_adapter):
    folder = make_adapter(tensors=lora_tensors(dora=True), adapter_config={"use_dora": True})  # peftkit.json says lora
    with pytest.raises(AdapterValidationError, match="peftkit.json: method='lora' but the adapter's files are a dora adapter"):
        reg.add(folder, "x")


def test_an_imported_archive_is_held_to_the_same_checks(reg, make_adapter, tmp_path):
    reg.add(make_adapter(), "bot")
    archive = reg.export("bot@1", tmp_path / "bot.tar")
    with tarfile.open(archive) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    manifest = json.loads(members["peftkit-manifest.json"])
    manifest["entry"]["method"] = "prefix"
    members["peftkit-manifest.json"] = json.dumps(manifest).encode()
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(tampered, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(AdapterValidationError, match="peftkit-manifest.json entry: method='prefix' but the adapter's files are a lora"):
        reg.import_(tampered, name="other")


# ---------------------------------------------------------------- found by tests/registry/test_fuzz_registry.py

@pytest.mark.parametrize("lineage, error", [
    # A string size in peftkit.json's base_config: was TypeError: unsupported operand type(s) for //: 'str' and 'int'.
    ({"base_config": {**LLAMA, "hidden_size": "LORA"}}, "hidden_size must be a whole number above 0, got 'LORA'"),
    # A null size: was TypeError from the same division.
    ({"base_config": {**LLAMA, "num_hidden_layers": None}}, "num_hidden_layers must be a whole number above 0, got None"),
    # A huge integer: was OverflowError: Python int too large to convert to SQLite INTEGER.
    ({"base_model": 2**70}, "peftkit.json: base_model must be a string, got int"),
    # A list: was sqlite3.ProgrammingError from binding the catalog row.
    ({"base_model": ["q_proj"]}, "peftkit.json: base_model must be a string, got list"),
    ({"created_at": {"day": 1}}, "peftkit.json: created_at must be a string, got dict"),
    # A made-up layer count: the new target check once walked all 2^70 layers (the fuzz run was killed at 24 GB).
    ({"base_config": {**LLAMA, "num_hidden_layers": 2**70}}, "num_hidden_layers=1180591620717411303424 is not a real model's"),
    # A number: was TypeError: 'int' object is not subscriptable, wording a base-mismatch error.
    ({"base_fingerprint": 5}, "peftkit.json: base_fingerprint must be a string, got int"),
])
def test_mistyped_lineage_is_refused_naming_file_and_field(reg, make_adapter, lineage, error):
    folder = make_adapter(lineage={**make_lineage(), **lineage})
    with pytest.raises(AdapterValidationError, match=error.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        reg.add(folder, "x")
    _assert_nothing_added(reg)


def test_a_prompt_config_with_an_object_for_num_virtual_tokens_is_refused(reg, make_adapter):
    # Was TypeError: unsupported operand type(s) for *: 'dict' and 'int', in the prompt shape check.
    folder = make_adapter(tensors={"prompt_embeddings": np.zeros((5, 64), np.float32)}, peft_type="PROMPT_TUNING",
                          adapter_config={"num_virtual_tokens": {"a": 1}}, lineage={"method": "prompt"})
    with pytest.raises(AdapterValidationError, match="adapter_config.json: num_virtual_tokens must be a whole number above 0"):
        reg.add(folder, "x")


def test_a_config_nested_thousands_deep_is_refused_not_a_recursion_error(reg, make_adapter):
    # Was RecursionError from reading base_model_name_or_path (registry.source) before validation.
    folder = make_adapter(lineage=False)
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterValidationError, match="adapter_config.json: not valid JSON \\(nested too deeply\\)"):
        reg.add(folder, "x")
    _assert_nothing_added(reg)


def test_a_header_nested_thousands_deep_is_refused(reg, make_adapter):
    folder = make_adapter()
    header = b"[" * 100_000 + b"]" * 100_000
    (folder / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(AdapterValidationError, match="adapter_model.safetensors: the header is not valid JSON"):
        reg.add(folder, "x")


def test_unknown_base_keeps_shapes_checked_against_each_other(reg, make_adapter):
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = np.zeros((64, 4), np.float32)
    with pytest.raises(AdapterValidationError, match="lora_A has rank 8 but lora_B has rank 4"):
        reg.add(make_adapter(tensors=tensors, lineage=False), "x")
