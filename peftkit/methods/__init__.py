"""Fine-tuning methods: METHODS maps the name users type to a builder; load_adapter reads any of them back.

Every builder takes the base model and the method section of the config and returns the
model to train, with only the method's parameters trainable.
"""
from __future__ import annotations

import json
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.methods import lora

METHODS = {
    "lora": lora.build,
    "dora": lora.build_dora,
    "qlora": lora.build,  # the 4-bit base is loaded by models.load_base(quantize_4bit=True)
}


class MethodError(PeftkitError):
    """A method cannot be built or an adapter cannot be loaded."""


def build_method(model, method_cfg):
    """Return the model wrapped for training with the configured method."""
    try:
        builder = METHODS[method_cfg.name]
    except KeyError:
        raise MethodError(f"method.name={method_cfg.name!r} is not available yet; choose one of {', '.join(METHODS)}") from None
    return builder(model, method_cfg)


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    """Return the adapter's lineage (peftkit.json), or what adapter_config.json tells for foreign adapters."""
    adapter_dir = Path(adapter_dir)
    meta_file = adapter_dir / "peftkit.json"
    if meta_file.is_file():
        return json.loads(meta_file.read_text(encoding="utf-8"))
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise MethodError(f"{adapter_dir} holds no adapter_config.json: pass the adapter folder (e.g. runs/NAME/adapter)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    return {"base_model": config.get("base_model_name_or_path"), "method": str(config.get("peft_type", "")).lower(), "config": {}}


def load_adapter(model, adapter_dir: str | Path, *, adapter_name: str = "default", is_trainable: bool = False):
    """Return the base model with the adapter in adapter_dir attached (stock peft for the peft family)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MethodError(f"{adapter_dir} holds no adapter_config.json: pass the adapter folder (e.g. runs/NAME/adapter)")
    return PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable)
