"""The shipped presets under configs/: which file `peftkit train --data FILE [--model M] [--method M]` starts from.

Each folder but demo/ holds generic presets for one model, one file per method whose settings differ
(configs/<model>/<method>.yaml); the LoRA family (the methods the catalog gives no rate of their own:
lora, dora, qlora) falls back to the folder's lora.yaml with method.name swapped.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from peftkit.config import ConfigError
from peftkit.methods.catalog import CATALOG, METHOD_NAMES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO = CONFIGS / "demo" / "fernhill.yaml"
# Folders under configs/ that hold no model presets: the demo run, and accelerate's launch configs (peftkit.launch).
NOT_PRESETS = ("demo", "accelerate")
DEFAULT_MODEL = "smollm2-135m"


def generic_presets() -> dict[str, dict[str, Path]]:
    """Return {model folder: {method: preset file}} for every generic preset (all but configs/demo/ and accelerate/)."""
    out: dict[str, dict[str, Path]] = {}
    for f in sorted(CONFIGS.glob("*/*.yaml")):
        if f.parent.name not in NOT_PRESETS:
            out.setdefault(f.parent.name, {})[f.stem] = f
    return out


def preset_model(path: Path) -> str:
    """Return the model.name a preset file sets (read without building a config)."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return str((raw.get("model") or {}).get("name", ""))


def model_folder(model: str | None, presets: dict[str, dict[str, Path]]) -> str:
    """Return the preset folder for --model: a folder name, its model.name, or that name's last part (any case)."""
    if model is None:
        return DEFAULT_MODEL
    wanted = model.strip().rstrip("/").lower()
    for folder, files in presets.items():
        hub = preset_model(next(iter(files.values()))).lower()
        if wanted in {folder.lower(), hub, hub.rsplit("/", 1)[-1]}:
            return folder
    known = ", ".join(f"{folder} ({preset_model(next(iter(files.values())))})" for folder, files in presets.items())
    raise ConfigError(f"--model {model!r} has no preset; presets exist for {known}. For a local copy of one of these, "
                      f"pass --model <that one> --set model.name=PATH; for another model, pass a YAML config instead")


def pick_preset(model: str | None = None, method: str | None = None) -> tuple[Path, list[str]]:
    """Return the generic preset for a model and method, and the overrides it needs (method.name for the LoRA family)."""
    presets = generic_presets()
    folder = model_folder(model, presets)
    method = method or "lora"
    if method not in CATALOG:
        raise ConfigError(f"--method {method!r} is unknown; choose one of {', '.join(METHOD_NAMES)}")
    files = presets[folder]
    if method in files:
        return files[method], []
    if CATALOG[method].learning_rate is None and "lora" in files:
        return files["lora"], [f"method.name={json.dumps(method)}"]
    have = sorted(set(files) | ({m for m in METHOD_NAMES if CATALOG[m].learning_rate is None} if "lora" in files else set()))
    raise ConfigError(f"no preset for --method {method} on {folder}: configs/{folder}/ has {', '.join(sorted(files))}, "
                      f"so --method may be {', '.join(have)}; for {method}, pass a YAML config "
                      f"(e.g. copy configs/{folder}/lora.yaml and set method.name: {method})")
