"""Names, references and fingerprints: what is accepted, what is refused, what changes a fingerprint."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from peftkit.errors import PeftkitError
from peftkit.fingerprint import FingerprintError, base_fingerprint, file_sha256
from peftkit.registry import InvalidNameError
from peftkit.registry.names import Ref, check_name, check_relpath, parse_ref


@pytest.mark.parametrize("text, ref", [
    ("retail-bot", Ref("retail-bot")),
    ("retail-bot@3", Ref("retail-bot", version=3)),
    ("retail-bot:stable", Ref("retail-bot", tag="stable")),
    ("v1.2_x:rc-1", Ref("v1.2_x", tag="rc-1")),
])
def test_references_parse_to_name_version_or_tag(text, ref):
    assert parse_ref(text) == ref
    assert str(parse_ref(text)) == text


@pytest.mark.parametrize("bad", ["../etc", "/abs/path", "a/b", "", ".hidden", "-dash", "has space", "x" * 129, "é", "a\x00b", "a\\b"])
def test_unsafe_names_are_refused_with_the_rule(bad):
    with pytest.raises(InvalidNameError, match="letters, digits"):
        check_name(bad)


@pytest.mark.parametrize("bad", ["x@0", "x@-1", "x@two", "x@", "x:", "x:../y", "../x@1"])
def test_malformed_references_are_refused(bad):
    with pytest.raises(InvalidNameError):
        parse_ref(bad)


def test_the_name_error_names_the_key_the_value_and_the_rule():
    with pytest.raises(InvalidNameError) as info:
        check_name("my run", "name")
    assert str(info.value) == ("name 'my run' is not allowed; use 1 to 128 letters, digits, '.', '_' or '-', "
                               "starting with a letter or digit (no '/', no spaces, no '..')")


def test_the_name_rule_imports_without_torch():
    # The config checks run names with it before any model is loaded.
    code = ("import sys; from peftkit.registry.names import check_name; check_name('run-1'); "
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'peft', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_errors_are_peftkit_errors_so_the_cli_prints_one_line():
    with pytest.raises(PeftkitError):
        check_name("../x")


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../b", "a//b", "a\\b", "./a", "a/.", ""])
def test_unsafe_file_paths_are_refused(bad):
    with pytest.raises(InvalidNameError):
        check_relpath(bad)


def test_nested_relative_paths_are_allowed():
    assert check_relpath("tokenizer/tokenizer.json") == "tokenizer/tokenizer.json"


def test_file_sha256_matches_hashlib(tmp_path):
    data = np.random.default_rng(0).bytes(3 * 1024 * 1024 + 17)
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_base_fingerprint_is_stable_and_ignores_volatile_config_keys(base_dir, tmp_path):
    first = base_fingerprint(base_dir)
    assert first.startswith("sha256:") and len(first) == 7 + 64
    config = json.loads((base_dir / "config.json").read_text())
    config.update(transformers_version="9.9.9", _name_or_path="/somewhere/else")
    (base_dir / "config.json").write_text(json.dumps(config, indent=4, sort_keys=False))
    assert base_fingerprint(base_dir) == first


@pytest.mark.parametrize("change", ["config", "tokenizer", "weights_tail", "weights_header"])
def test_base_fingerprint_changes_with_config_tokenizer_and_weights(base_dir, change):
    before = base_fingerprint(base_dir)
    if change == "config":
        config = json.loads((base_dir / "config.json").read_text())
        (base_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    elif change == "tokenizer":
        (base_dir / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    elif change == "weights_tail":  # the last bytes of the data region (the norm weights)
        raw = bytearray((base_dir / "model.safetensors").read_bytes())
        raw[-1] ^= 0xFF
        (base_dir / "model.safetensors").write_bytes(bytes(raw))
    else:
        save_file({"model.embed_tokens.weight": np.zeros((512, 64), np.float16)}, str(base_dir / "model.safetensors"))
    assert base_fingerprint(base_dir) != before


def test_base_fingerprint_reads_only_the_ends_of_large_weights(base_dir):
    # A change in the middle of a big file is (by design) not seen: the cost stays a few MiB per file.
    big = base_dir / "model-00002-of-00002.safetensors"
    save_file({"w": np.zeros(3 * 1024 * 1024, np.uint8)}, str(big))
    before = base_fingerprint(base_dir)
    raw = bytearray(big.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    big.write_bytes(bytes(raw))
    assert base_fingerprint(base_dir) == before


def test_base_fingerprint_needs_a_config(tmp_path):
    with pytest.raises(FingerprintError, match="no config.json"):
        base_fingerprint(tmp_path)
