"""What `registry add` reads from disk: an adapter folder or a training run folder, its lineage and its base.

A run folder (what `peftkit train` writes) holds adapter/, config.yaml and metrics.json; only the
files in adapter/ are stored, the run's config and metrics go into the catalog. An adapter folder
holds the PEFT files (or a full fine-tune's config.json + model*.safetensors), optional tokenizer
files and README.md, and peftkit.json, the lineage training writes.

Only the files an adapter needs are stored (ADAPTER_FILES: the PEFT or full fine-tune files, tokenizer
files, README.md and peftkit.json); anything else in the folder (notes, logs, checkpoints) is left out
and reported, unless include_extra (--include-extra-files) asks for it. A symbolic link is followed
only when it stays inside the folder (or is a Hugging Face cache snapshot's link into its blobs/):
a link out of the folder is refused, so `add` can never copy, and `export` never ship, a file such
as ~/.aws/credentials that happens to be linked in.

Without peftkit.json (an adapter from elsewhere) the base comes from the options: --base-model DIR
records the base's fingerprint and config and checks shapes against it; --base-config FILE checks
shapes only. With neither, the adapter is stored with an unknown base, its tensors are checked only
against each other, and the CLI says so. A name whose earlier versions have a known base refuses a
version with an unknown or different base unless --allow-base-mismatch is given.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.fingerprint import base_fingerprint
from peftkit.registry.errors import AdapterValidationError
from peftkit.registry.names import check_relpath
from peftkit.registry.validate import check_types, load_json, refuse_pickles

LINEAGE_FILE = "peftkit.json"
ADAPTER_FILES = frozenset({
    "adapter_config.json", "adapter_model.safetensors",                               # a PEFT adapter
    "config.json", "generation_config.json", "model.safetensors.index.json",          # a full fine-tune (+ model*.safetensors)
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",                 # its tokenizer, when saved with it
    "README.md", LINEAGE_FILE,                                                        # model card and lineage
})
LINEAGE_TYPES = {"base_model": str, "base_fingerprint": str, "base_config": dict, "method": str, "created_at": str,
                 "data_fingerprint": str, "parent": str, "metrics": dict, "config": dict}


@dataclass
class Source:
    """The files to store (relative path -> file on disk) and what is known about how they were made."""

    root: Path
    files: dict[str, Path]
    lineage: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] | None = None
    run_metrics: dict[str, Any] | None = None
    left_out: list[str] = field(default_factory=list)
    """Files in the folder that are not adapter files and were not asked for (include_extra)."""


@dataclass
class Base:
    """The base model an adapter belongs to; every field is None when it is unknown."""

    model: str | None = None
    fingerprint: str | None = None
    config: dict[str, Any] | None = None


def read_source(path: str | Path, include_extra: bool = False) -> Source:
    """Return the Source for an adapter folder or a training run folder; pickle files and links out are refused unread."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterValidationError(f"{path} is not a folder; pass an adapter folder (adapter_config.json + adapter_model.safetensors) or a training run folder")
    run = _read_run(path) if (path / "adapter").is_dir() else None
    root = path / "adapter" if run is not None else path
    found = _list_files(root)
    if not found:
        raise AdapterValidationError(f"{root} holds no files; pass the folder save_pretrained() wrote")
    files = {rel: p for rel, p in found.items() if include_extra or is_adapter_file(rel)}
    for rel in files:
        check_relpath(rel, f"{root}:")
    lineage = read_lineage(files[LINEAGE_FILE], root / LINEAGE_FILE) if LINEAGE_FILE in files else {}
    return Source(root, files, lineage, *(run or (None, None)), left_out=sorted(set(found) - set(files)))


def is_adapter_file(relpath: str) -> bool:
    """Return True for a file an adapter folder needs (stored without --include-extra-files)."""
    return "/" not in relpath and (relpath in ADAPTER_FILES or (relpath.startswith("model") and relpath.endswith(".safetensors")))


def read_lineage(path: Path, label: Path) -> dict[str, Any]:
    """Return peftkit.json's record after checking the type of every field the catalog keeps."""
    lineage = load_json(path, str(label))
    check_types(lineage, LINEAGE_TYPES, str(label), f"fix it, or delete {LINEAGE_FILE} and pass --base-model DIR")
    return lineage


def resolve_base(source: Source, base_config: str | Path | None = None, base_model_dir: str | Path | None = None) -> tuple[Base, str | None]:
    """Return (the base, the fingerprint the lineage records when it differs from base_model_dir's)."""
    lin = source.lineage
    base = Base(lin.get("base_model"), lin.get("base_fingerprint"), lin.get("base_config"))
    disagrees = None
    if base_model_dir is not None:
        model_dir = Path(base_model_dir)
        found = base_fingerprint(model_dir)
        if base.fingerprint and base.fingerprint != found:
            disagrees = base.fingerprint
        base = Base(base.model or model_dir.name, found, load_json(model_dir / "config.json", f"{model_dir / 'config.json'}"))
    if base_config is not None:
        base.config = load_json(Path(base_config), str(base_config))
    if base.model is None:
        base.model = _adapter_config_base(source)
    return base, disagrees


# ---------------------------------------------------------------- internals

def _read_run(path: Path) -> tuple[dict | None, dict | None]:
    import yaml  # only run folders need it; keeps `import peftkit.registry` light

    config = metrics = None
    if (path / "config.yaml").is_file():
        try:
            config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise AdapterValidationError(f"{path / 'config.yaml'}: not valid YAML ({exc})") from None
    if (path / "metrics.json").is_file():
        metrics = load_json(path / "metrics.json", str(path / "metrics.json"))
    return config if isinstance(config, dict) else None, metrics


def _list_files(root: Path) -> dict[str, Path]:
    """Return {relative path: file to read} for every file under root; symlinked folders are not followed."""
    inside = [root.resolve(), *_hf_cache_blobs(root.resolve())]
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            full = Path(dirpath) / fname
            if full.is_symlink():
                full = _link_target(full, root, inside)
            if full.is_file():
                files[(Path(dirpath) / fname).relative_to(root).as_posix()] = full
    refuse_pickles(list(files), str(root))
    return files


def _link_target(link: Path, root: Path, inside: list[Path]) -> Path:
    """Return the file a symbolic link points at, refusing one that leaves the folder or loops."""
    try:
        target = link.resolve()
    except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError for a loop, later versions OSError
        raise AdapterValidationError(f"{link} is a symbolic link that loops back on itself; replace it with the file it stands for, or remove it") from None
    if not any(target == folder or folder in target.parents for folder in inside):
        raise AdapterValidationError(
            f"{link} is a symbolic link to {target}, outside the adapter folder {root}; `registry add` would store that "
            "file and `registry export` ship it. Copy the file into the folder if the adapter needs it, or remove the link")
    return target


def _hf_cache_blobs(root: Path) -> list[Path]:
    # A Hugging Face cache snapshot (.../models--org--name/snapshots/<rev>/) holds links into ../../blobs/.
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
            return [(folder.parent.parent / "blobs").resolve()]
    return []


def _adapter_config_base(source: Source) -> str | None:
    path = source.files.get("adapter_config.json")
    if path is None:
        return None
    try:
        value = load_json(path, "adapter_config.json").get("base_model_name_or_path")
    except AdapterValidationError:
        return None  # validate_files says what is wrong with it
    return value if isinstance(value, str) and value else None
