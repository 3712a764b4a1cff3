"""What `registry add` reads from disk: an adapter folder or a training run folder, its lineage and its base.

A run folder (what `peftkit train` writes) holds adapter/, config.yaml and metrics.json; only the
files in adapter/ are stored, the run's config and metrics go into the catalog. An adapter folder
holds the PEFT files (or a full fine-tune's config.json + model*.safetensors), optional tokenizer
files and README.md, and peftkit.json, the lineage training writes.

Without peftkit.json (an adapter from elsewhere) the base comes from the options: --base-model DIR
records the base's fingerprint and config and checks shapes against it; --base-config FILE checks
shapes only. With neither, the adapter is stored with an unknown base, its tensors are checked only
against each other, and the CLI says so. A name whose earlier versions have a known base refuses a
version with an unknown or different base unless --allow-base-mismatch is given.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.fingerprint import base_fingerprint
from peftkit.registry.errors import AdapterValidationError
from peftkit.registry.names import check_relpath
from peftkit.registry.validate import load_json, refuse_pickles

LINEAGE_FILE = "peftkit.json"


@dataclass
class Source:
    """The files to store (relative path -> file on disk) and what is known about how they were made."""

    root: Path
    files: dict[str, Path]
    lineage: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] | None = None
    run_metrics: dict[str, Any] | None = None


@dataclass
class Base:
    """The base model an adapter belongs to; every field is None when it is unknown."""

    model: str | None = None
    fingerprint: str | None = None
    config: dict[str, Any] | None = None


def read_source(path: str | Path) -> Source:
    """Return the Source for an adapter folder or a training run folder; pickle files are refused unread."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterValidationError(f"{path} is not a folder; pass an adapter folder (adapter_config.json + adapter_model.safetensors) or a training run folder")
    run = _read_run(path) if (path / "adapter").is_dir() else None
    root = path / "adapter" if run is not None else path
    files = _list_files(root)
    if not files:
        raise AdapterValidationError(f"{root} holds no files; pass the folder save_pretrained() wrote")
    lineage = load_json(files[LINEAGE_FILE], f"{root / LINEAGE_FILE}") if LINEAGE_FILE in files else {}
    return Source(root, files, lineage, *(run or (None, None)))


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
    # Symlinked files are read through (Hugging Face cache snapshots are links); symlinked folders are not followed.
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            full = Path(dirpath) / fname
            if full.is_file():
                files[full.relative_to(root).as_posix()] = full
    refuse_pickles(list(files), str(root))
    for rel in files:
        check_relpath(rel, f"{root}:")
    return files


def _adapter_config_base(source: Source) -> str | None:
    path = source.files.get("adapter_config.json")
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None
