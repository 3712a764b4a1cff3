"""Fine-tuning methods: METHODS maps the name users type to a builder; load_adapter reads any of them back.

Every builder takes the base model and the method section of the config and returns the
model to train, with only the method's parameters trainable. Every returned model saves
itself with `save_pretrained(dir, safe_serialization=True)`: adapter_config.json plus
adapter_model.safetensors, or for full fine-tuning the whole model (config.json plus
model.safetensors); `load_adapter` dispatches on which it finds and on the `peft_type`.
"""
from __future__ import annotations

import json
from pathlib import Path

from peftkit.methods import bottleneck, full, ia3, lora, prompt
from peftkit.methods.errors import MethodError

METHODS = {
    "lora": lora.build,
    "dora": lora.build_dora,
    "qlora": lora.build_qlora,  # the 4-bit base is loaded by models.load_base(quantize_4bit=True)
    "prefix": prompt.build_prefix,
    "prompt": prompt.build_prompt,
    "ia3": ia3.build,
    "bottleneck": bottleneck.build,
    "full": full.build,
}

# peft_type in adapter_config.json -> loader for the types peft itself cannot read back
# (a full fine-tune has no adapter_config.json: see full.is_full_finetune).
LOADERS = {
    bottleneck.PEFT_TYPE: bottleneck.load,
    "PREFIX_TUNING": prompt.load,
    "PROMPT_TUNING": prompt.load,
}

__all__ = ["METHODS", "MethodError", "build_method", "load_adapter", "read_adapter_config", "read_adapter_meta"]


def build_method(model, method_cfg):
    """Return the model wrapped for training with the configured method."""
    try:
        builder = METHODS[method_cfg.name]
    except KeyError:
        raise MethodError(f"method.name={method_cfg.name!r} is unknown; choose one of {', '.join(METHODS)}") from None
    return builder(model, method_cfg)


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
    if full.is_full_finetune(adapter_dir):
        return {"base_model": None, "method": "full", "config": {}}
    config = read_adapter_config(adapter_dir)
    return {"base_model": config.get("base_model_name_or_path"), "method": str(config.get("peft_type", "")).lower(), "config": {}}


def load_adapter(model, adapter_dir: str | Path, *, adapter_name: str = "default", is_trainable: bool = False):
    """Return the base model with the adapter in adapter_dir attached (stock peft for the peft family)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if full.is_full_finetune(adapter_dir):
        return full.load(model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable)
    peft_type = str(read_adapter_config(adapter_dir).get("peft_type", ""))
    loader = LOADERS.get(peft_type)
    if loader is not None:
        return loader(model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable)
    return PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable)
