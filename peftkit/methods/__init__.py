"""Fine-tuning methods: build_method wraps a base for training, load_adapter reads any adapter back.

What each method is (its name, peft types, how it is served, merged and loaded) is one record in
`peftkit.methods.catalog`; this module resolves the builders and loaders those records name, so
importing it stays free of torch until a model is built.

Every builder takes the base model and the method section of the config and returns the
model to train, with only the method's parameters trainable. Every returned model saves
itself with `save_pretrained(dir, safe_serialization=True)`: adapter_config.json plus
adapter_model.safetensors, or for full fine-tuning the whole model (config.json plus
model.safetensors); `load_adapter` dispatches on which it finds and on the `peft_type`.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable

from peftkit.methods.catalog import CATALOG, FULL, METHOD_NAMES, method_of
from peftkit.methods.errors import MethodError
from peftkit.methods.full import is_full_finetune

__all__ = ["CATALOG", "METHOD_NAMES", "MethodError", "build_method", "builder", "load_adapter", "loader_for",
           "read_adapter_config", "read_adapter_meta"]


def _resolve(spec: str) -> Callable:
    module, function = spec.split(":")
    return getattr(importlib.import_module(f"peftkit.methods.{module}"), function)


def builder(name: str) -> Callable:
    """Return the function that wraps a base model for training with the method users call name."""
    try:
        return _resolve(CATALOG[name].builder)
    except KeyError:
        raise MethodError(f"method.name={name!r} is unknown; choose one of {', '.join(METHOD_NAMES)}") from None


def loader_for(peft_type: str) -> Callable | None:
    """Return peftkit's own loader for a peft_type stock peft cannot read back (None: stock peft reads it)."""
    spec = next((m.loader for m in CATALOG.values() if peft_type in m.peft_types and m.loader), None)
    return _resolve(spec) if spec else None


def build_method(model, method_cfg):
    """Return the model wrapped for training with the configured method."""
    return builder(method_cfg.name)(model, method_cfg)


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """Return adapter_config.json of an adapter folder as a dict."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise MethodError(f"{adapter_dir} holds no adapter_config.json (nor a full fine-tune's config.json + model.safetensors): "
                      "pass the adapter folder (e.g. runs/NAME/adapter)")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MethodError(f"{config_file} is not valid JSON ({exc}); the adapter folder is damaged, save it again") from None


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    """Return the adapter's lineage (peftkit.json), or what adapter_config.json tells for foreign adapters."""
    adapter_dir = Path(adapter_dir)
    meta_file = adapter_dir / "peftkit.json"
    if meta_file.is_file():
        return json.loads(meta_file.read_text(encoding="utf-8"))
    config = None if is_full_finetune(adapter_dir) else read_adapter_config(adapter_dir)
    return {"base_model": config and config.get("base_model_name_or_path"), "method": method_of(config), "config": {}}


def load_adapter(model, adapter_dir: str | Path, *, adapter_name: str = "default", is_trainable: bool = False):
    """Return the base model with the adapter in adapter_dir attached (stock peft for the peft family)."""
    adapter_dir = Path(adapter_dir)
    if is_full_finetune(adapter_dir):
        return _resolve(CATALOG[FULL].loader)(model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable)
    loader = loader_for(str(read_adapter_config(adapter_dir).get("peft_type", "")))
    if loader is None:
        from peft import PeftModel

        loader = PeftModel.from_pretrained
    return loader(model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable)
