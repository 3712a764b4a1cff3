"""Fingerprints of files and base models, cheap enough to compute on every run (no torch).

A base fingerprint identifies a base model by its config, its tokenizer and a sample of its
weights: each safetensors file's header (every tensor name, dtype, shape and offset), its size,
and its first and last MiB. Two copies of the same model agree; a model with other weights,
another tokenizer or another architecture disagrees; a 16 GB model costs a few MiB of reading.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

CHUNK = 1 << 20
SAMPLE = 1 << 20  # bytes read from each end of a weights file
# Keys that change when the same model is re-saved by another tool or version.
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")


class FingerprintError(PeftkitError, ValueError):
    """A model folder cannot be fingerprinted; the message says what is missing."""


def file_sha256(path: str | Path) -> str:
    """Return the hex sha256 of a file's bytes (64 characters, no prefix, as `sha256sum` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(value: Any) -> bytes:
    """Return JSON bytes that are equal whenever the values are equal (sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def base_fingerprint(model_dir: str | Path) -> str:
    """Return "sha256:<hex>" identifying a local HF model folder (or a single .gguf file)."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        return _prefixed({"scheme": 1, "weights": {model_dir.name: _weights_sample(model_dir)}})
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FingerprintError(f"{model_dir} has no config.json; pass a Hugging Face model folder (config.json, tokenizer and *.safetensors)")
    weights = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    doc = {
        "scheme": 1,
        "config": hashlib.sha256(canonical_json(_stable_config(config_path))).hexdigest(),
        "tokenizer": {name: _tokenizer_digest(model_dir / name) for name in TOKENIZER_FILES if (model_dir / name).is_file()},
        "weights": {p.name: _weights_sample(p) for p in weights},
    }
    return _prefixed(doc)


# ---------------------------------------------------------------- internals

def _prefixed(doc: dict) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(doc)).hexdigest()


def _stable_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FingerprintError(f"{path}: not readable JSON ({exc}); re-save the model with save_pretrained") from None
    return {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}


def _tokenizer_digest(path: Path) -> str:
    # JSON files are compared by content so that key order or indentation does not count.
    if path.suffix == ".json":
        try:
            return hashlib.sha256(canonical_json(json.loads(path.read_text(encoding="utf-8")))).hexdigest()
        except ValueError:
            pass
    return file_sha256(path)


def _weights_sample(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(SAMPLE)
        f.seek(max(0, size - SAMPLE))
        tail = f.read(SAMPLE)
        header = _safetensors_header_bytes(f, size) if path.suffix == ".safetensors" else b""
    return {
        "size": size,
        "header": hashlib.sha256(header).hexdigest(),
        "head": hashlib.sha256(head).hexdigest(),
        "tail": hashlib.sha256(tail).hexdigest(),
    }


def _safetensors_header_bytes(f, size: int) -> bytes:
    # The header can be larger than the sampled first MiB on very large models: hash all of it.
    f.seek(0)
    raw = f.read(8)
    if len(raw) < 8:
        return b""
    (length,) = struct.unpack("<Q", raw)
    if length > size - 8:
        return b""
    return f.read(length)
