"""Fuzzing `registry add`: a malformed adapter folder is either registered whole or refused with a RegistryError
naming the file (and field) at fault, and a refusal leaves nothing behind: no row, no blob, no temp file.

The normal suite runs a small fixed-seed sample; the long form draws fresh examples:
    PEFTKIT_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/registry/test_fuzz_registry.py -q -p no:cacheprovider \
        --hypothesis-show-statistics
(docs/reliability.md records what it found).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from peftkit.errors import PeftkitError
from peftkit.registry import BaseMismatchError, RegistryError
from registry_fakes import IO, LLAMA, lora_tensors, make_lineage, write_adapter

EXAMPLES = int(os.environ.get("PEFTKIT_FUZZ_EXAMPLES", "0")) or 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="PEFTKIT_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck), print_blob=True)
SECRET = b"aws_secret_access_key = FUZZ-SECRET-never-stored"
CONFIG_KEYS = ["peft_type", "r", "target_modules", "rank_pattern", "alpha_pattern", "lora_alpha", "lora_dropout",
               "layers_to_transform", "layers_pattern", "exclude_modules", "modules_to_save", "use_dora", "use_rslora",
               "num_virtual_tokens", "num_transformer_submodules", "base_model_name_or_path", "feedforward_modules"]
LINEAGE_KEYS = ["base_model", "base_fingerprint", "base_config", "method", "created_at", "data_fingerprint", "parent",
                "metrics", "config"]
BASE_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "head_dim"]
PLAUSIBLE = ["LORA", "LOHA", "lora", "IA3", "PROMPT_TUNING", "all-linear", ".*q_proj", "(", "q_proj", ["q_proj"],
             ["q_proj", "v_proj"], ["k_proj"], ["q_proj", "v_proj", "k_proj"], {"q_proj": 4}, {"(": 4}, {"v_proj": "8"},
             [0], [5], 1, 0, -1, 4, 8, 16, 2**70, 1.5, True, None, "", "x" * 300, "sha256:" + "ab" * 32]

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)
values = st.sampled_from(PLAUSIBLE) | json_values
garbage = st.binary(max_size=64) | st.sampled_from([b"", b"{", b"[]", b"null", b"\xef\xbb\xbf{}", b"[" * 100_000,
                                                    b'{"r": ' + b"9" * 5000 + b"}"])


def _clear(path: Path) -> None:
    """Remove whatever an earlier mutation put at path (a file, a link, a folder)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _edit_json(folder: Path, name: str, edit) -> None:
    path = folder / name
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        record = make_lineage() if name == "peftkit.json" else {}
    edit(record if isinstance(record, dict) else {})
    _clear(path)
    path.write_text(json.dumps(record) if isinstance(record, dict) else "{}")


def config_field(draw, folder: Path) -> str:
    key = draw(st.sampled_from(CONFIG_KEYS))
    delete, value = draw(st.booleans()), draw(values)
    _edit_json(folder, "adapter_config.json", lambda c: c.pop(key, None) if delete else c.__setitem__(key, value))
    return f"adapter_config.json {key}"


def lineage_field(draw, folder: Path) -> str:
    key = draw(st.sampled_from(LINEAGE_KEYS + BASE_KEYS))
    value = draw(values)
    if key in BASE_KEYS:
        _edit_json(folder, "peftkit.json", lambda c: c.__setitem__("base_config", {**LLAMA, key: value}))
    else:
        _edit_json(folder, "peftkit.json", lambda c: c.__setitem__(key, value))
    return f"peftkit.json {key}"


def json_bytes(draw, folder: Path) -> str:
    name = draw(st.sampled_from(["adapter_config.json", "peftkit.json"]))
    _clear(folder / name)
    (folder / name).write_bytes(draw(garbage))
    return f"{name} bytes"


def weights_bytes(draw, folder: Path) -> str:
    path = folder / "adapter_model.safetensors"
    if not path.is_file() or path.is_symlink() or path.stat().st_size < 8:
        return "weights absent"
    raw = path.read_bytes()
    how = draw(st.sampled_from(["cut", "length", "header", "flip", "pickle", "garbage"]))
    if how == "cut":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif how == "length":
        raw = struct.pack("<Q", draw(st.sampled_from([0, 1, 2, len(raw), 2**31, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))) + raw[8:]
    elif how == "header":
        header = json.dumps(draw(json_values | st.dictionaries(st.text(max_size=40), json_values, max_size=3))).encode()
        raw = struct.pack("<Q", len(header)) + header + raw[8 + struct.unpack("<Q", raw[:8])[0]:]
    elif how == "flip":
        at = draw(st.integers(0, min(len(raw), 400) - 1))
        raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    elif how == "pickle":
        raw = pickle.dumps({"w": [1, 2, 3]})
    else:
        raw = draw(garbage)
    _clear(path)
    path.write_bytes(raw)
    return f"weights {how}"


def tensors(draw, folder: Path) -> str:
    modules = tuple(draw(st.lists(st.sampled_from(list(IO)), min_size=1, max_size=3, unique=True)))
    out = lora_tensors(rank=draw(st.sampled_from([1, 4, 8, 16])), modules=modules, layers=draw(st.integers(1, 3)))
    names = sorted(out)
    for name in draw(st.lists(st.sampled_from(names), max_size=2, unique=True)):
        how = draw(st.sampled_from(["drop", "reshape", "rename"]))
        array = out.pop(name)
        if how == "reshape":
            out[name] = np.zeros(draw(st.lists(st.integers(0, 70), max_size=3)), np.float32)
        elif how == "rename":
            out[draw(st.sampled_from([name.replace("q_proj", "qq"), "x", name + ".extra", "lm_head.lora_A.weight"]))] = array
    _clear(folder / "adapter_model.safetensors")
    save_file(out, str(folder / "adapter_model.safetensors"))
    return "tensors"


def files(draw, folder: Path) -> str:
    name = draw(st.sampled_from(["notes.txt", "README.md", "tokenizer.json", "adapter_model.safetensors", "adapter_config.json",
                                 "a b.txt", "ü.txt", "sub/notes.txt", "training_args.bin", "model.pt"]))
    how = draw(st.sampled_from(["link-out", "link-in", "dangling", "loop", "dir", "pickle", "file", "delete"]))
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear(path)
    if how == "link-out":
        path.symlink_to(folder.parent / "secret.txt")
    elif how == "link-in":
        path.symlink_to(folder / "adapter_config.json")
    elif how == "dangling":
        path.symlink_to(folder / "no-such-file")
    elif how == "loop":
        path.symlink_to(path)
    elif how == "dir":
        path.mkdir()
    elif how == "pickle":
        path.write_bytes(pickle.dumps([1]))
    elif how == "file":
        path.write_bytes(draw(garbage))
    return f"{how} {name}"


MUTATIONS = [config_field, lineage_field, json_bytes, weights_bytes, tensors, files]


def _state(reg) -> tuple:
    temps = sorted(p.name for p in reg.store.tmp.iterdir()) if reg.store.tmp.is_dir() else []
    return len(reg.list()), sorted(sha for sha, _ in reg.store.iter_blobs()), temps


def _assert_names_a_file(message: str, folder: Path) -> None:
    names = [str(folder), *(p.name for p in folder.rglob("*")), "adapter_config.json", "adapter_model.safetensors",
             "peftkit.json", "config.json"]
    assert any(n in message for n in names), f"the error names no file: {message}"


@FUZZ
@given(data=st.data())
def test_any_adapter_folder_is_registered_whole_or_refused_cleanly(reg, tmp_path_factory, data):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "secret.txt").write_bytes(SECRET)
    folder = write_adapter(root / "adapter", lineage=data.draw(st.booleans(), label="lineage"))
    done = [m(data.draw, folder) for m in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3), label="mutations")]
    before = _state(reg)
    try:
        entry = reg.add(folder, "fz")
    except PeftkitError as exc:
        assert isinstance(exc, RegistryError), f"{type(exc).__name__}: {exc}"
        event(f"refused: {type(exc).__name__}: {re.sub(r'[0-9]+', 'N', str(exc))[:50]}")
        if isinstance(exc, BaseMismatchError):  # about the name's earlier versions, not a file: it names those
            assert re.search(r"fz@\d+ was trained on base", str(exc)), str(exc)
        else:
            _assert_names_a_file(str(exc), folder)
            if len(done) == 1 and done[0].startswith(("adapter_config.json ", "peftkit.json ")) and "bytes" not in done[0]:
                field = done[0].split()[1]  # one field changed: the refusal names it (or the tensors it disagrees with)
                assert field in str(exc) or "tensor" in str(exc), f"{done[0]}: {exc}"
        assert _state(reg) == before, f"a refused add left something behind: {done}"
        return
    event("registered")
    stored = [reg.store.blob_path(f.sha256).read_bytes() for f in entry.files]
    assert not any(SECRET in b for b in stored), f"a file from outside the folder was stored: {done}"
    assert reg.verify(entry.ref).ok
    checkout = reg.checkout(entry.ref)
    assert sorted(p.relative_to(checkout).as_posix() for p in checkout.rglob("*") if p.is_file()) == sorted(f.path for f in entry.files)
