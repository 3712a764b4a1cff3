"""`peftkit registry ...` from the command line: what each command prints and its exit code."""
from __future__ import annotations

import json

import pytest

from peftkit.cli import main


@pytest.fixture
def run(tmp_path, capsys):
    """Return run(*args) -> (exit code, stdout, stderr) for `peftkit registry ARGS --registry <tmp>`."""
    home = tmp_path / "reg"

    def call(*args: str):
        code = main(["registry", *args, "--registry", str(home)])
        out, err = capsys.readouterr()
        return code, out, err
    return call


def test_add_list_show_tag_remove(run, make_adapter):
    code, out, _ = run("add", str(make_adapter()), "--name", "retail-bot", "--tag", "stable", "--domain", "retail")
    assert code == 0 and out.startswith("added retail-bot@1: lora rank 8, 3 files,") and "tags stable" in out
    run("add", str(make_adapter()), "--name", "retail-bot")
    code, out, _ = run("list")
    lines = out.splitlines()
    assert lines[0].split() == ["REF", "TAGS", "METHOD", "RANK", "BASE", "DOMAIN", "SIZE", "CREATED"]
    assert lines[1].split()[:6] == ["retail-bot@1", "stable", "lora", "8", "tiny-llama", "retail"]
    assert lines[2].split()[:2] == ["retail-bot@2", "-"]
    code, out, _ = run("show", "retail-bot:stable")
    assert "ref:              retail-bot@1" in out and "eval_loss: 1.25" in out and "adapter_model.safetensors" in out
    code, out, _ = run("tag", "retail-bot@2", "stable")
    assert out.strip() == "retail-bot:stable -> retail-bot@2"
    code, out, _ = run("remove", "retail-bot@1")
    assert out.strip() == "removed retail-bot@1"
    assert [r["ref"] for r in json.loads(run("list", "--json")[1])] == ["retail-bot@2"]


def test_list_filters_and_json(run, make_adapter):
    run("add", str(make_adapter()), "--name", "a", "--domain", "retail")
    run("add", str(make_adapter()), "--name", "b", "--domain", "legal")
    rows = json.loads(run("list", "--domain", "legal", "--json")[1])
    assert [r["ref"] for r in rows] == ["b@1"] and rows[0]["domain"] == "legal"
    assert run("list", "--base", "no-such-base")[1].strip() == "no adapters match"
    assert [r["ref"] for r in json.loads(run("list", "--latest", "--json")[1])] == ["a@1", "b@1"]
    shown = json.loads(run("show", "a", "--json")[1])
    assert shown["ref"] == "a@1" and shown["base_config"]["hidden_size"] == 64 and len(shown["files"]) == 3


def test_an_empty_registry_says_how_to_add(run):
    assert "no adapters registered; add one with `peftkit registry add DIR --name NAME`" in run("list")[1]


@pytest.mark.parametrize("args, words", [
    (("show", "nope"), "no adapter named 'nope'"),
    (("show", "../etc"), "is not allowed"),
    (("add", "/nonexistent/dir", "--name", "x"), "is not a folder"),
    (("add", ".", "--name", "../escape"), "name '../escape' is not allowed"),
])
def test_errors_print_one_line_and_exit_2(run, args, words):
    code, out, err = run(*args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and words in err and err.count("\n") == 1


def test_adding_a_pickle_fails_with_exit_2(run, make_adapter):
    folder = make_adapter()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04junk")
    code, _, err = run("add", str(folder), "--name", "x")
    assert code == 2 and "never loads pickle" in err


def test_add_without_lineage_says_the_base_is_unknown(run, make_adapter):
    code, out, err = run("add", str(make_adapter(lineage=False)), "--name", "x")
    assert code == 0 and "base tiny-llama" in out
    assert "note: the base model is unknown" in err and "--base-model DIR" in err


def test_add_the_same_folder_twice_reports_it(run, make_adapter):
    folder = make_adapter()
    run("add", str(folder), "--name", "x")
    code, out, _ = run("add", str(folder), "--name", "x")
    assert code == 0 and out.strip() == "already registered as x@1 (same name and files); nothing added"


def test_verify_reports_the_corrupt_file_and_exits_1(run, make_adapter, tmp_path):
    run("add", str(make_adapter()), "--name", "x")
    code, out, _ = run("verify")
    assert code == 0 and out.startswith("ok: 1 entries, 3 files")
    shown = json.loads(run("show", "x", "--json")[1])
    weights = next(f for f in shown["files"] if f["path"] == "adapter_model.safetensors")
    blob = tmp_path / "reg" / "blobs" / "sha256" / weights["sha256"][:2] / weights["sha256"]
    blob.chmod(0o644)
    raw = bytearray(blob.read_bytes())
    raw[100] ^= 0xFF
    blob.write_bytes(bytes(raw))
    code, out, _ = run("verify", "x@1")
    assert code == 1
    first = out.splitlines()[0]
    assert first.startswith(f"x@1 adapter_model.safetensors: corrupt (expected sha256 {weights['sha256'][:12]}, found sha256 ")
    assert out.splitlines()[-1].startswith("FAILED: 1 bad files")
    report = json.loads(run("verify", "--json")[1])
    assert report["ok"] is False and report["problems"][0]["path"] == "adapter_model.safetensors"


def test_export_import_gc_checkout(run, make_adapter, tmp_path):
    run("add", str(make_adapter()), "--name", "x")
    code, out, _ = run("export", "x", str(tmp_path / "x.tar"))
    assert code == 0 and out.startswith(f"exported x@1 to {tmp_path / 'x.tar'}")
    code, out, _ = run("import", str(tmp_path / "x.tar"))
    assert out.strip() == f"{tmp_path / 'x.tar'} is already registered as x@1 (same name and files); nothing added"
    code, out, _ = run("import", str(tmp_path / "x.tar"), "--name", "y")
    assert out.strip() == f"imported {tmp_path / 'x.tar'} as y@1"
    code, out, _ = run("checkout", "y")
    assert out.strip().endswith("checkouts/y@1") and (tmp_path / "reg" / "checkouts" / "y@1" / "adapter_config.json").is_file()
    run("remove", "x")
    code, out, _ = run("gc")
    assert code == 0 and out.startswith("freed 0 unused blobs")  # y@1 still uses them; remove freed nothing


def test_registry_option_defaults_to_peftkit_home(tmp_path, monkeypatch, capsys, make_adapter):
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))
    assert main(["registry", "add", str(make_adapter()), "--name", "x"]) == 0
    assert (tmp_path / "home" / "registry" / "catalog.db").is_file()
