"""Full fine-tuning: every weight trains; the reference the parameter-efficient methods are judged against.

The "adapter" is the whole model in the standard transformers layout (config.json and
model*.safetensors, no adapter_config.json), which is also what the registry accepts as a
full fine-tune and what `AutoModelForCausalLM.from_pretrained` loads as is. It cannot be
disabled: the base weights themselves changed.
"""
from __future__ import annotations

import json
import types
from pathlib import Path

from peftkit.methods.errors import MethodError


def build(model, method_cfg):
    """Return the base model with every parameter trainable (and a disable_adapter that says it cannot)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise MethodError("method.name='full' cannot train a quantized base (4-bit weights have no gradients): "
                          "load the base in fp32 or bf16, or use method.name=qlora")
    model.requires_grad_(True)
    return _mark(model)


def is_full_finetune(folder: Path) -> bool:
    """Return True when folder holds a whole model (config.json + model*.safetensors) rather than an adapter."""
    folder = Path(folder)
    return (not (folder / "adapter_config.json").is_file() and (folder / "config.json").is_file()
            and any(folder.glob("model*.safetensors")))


def load(model, adapter_dir: Path, *, adapter_name: str = "default", is_trainable: bool = False):
    """Return the base model carrying the fine-tuned weights saved in adapter_dir."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    index = adapter_dir / "model.safetensors.index.json"
    if index.is_file():  # large models are saved in shards
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    missing_files = [f for f in files if not (adapter_dir / f).is_file()]
    if missing_files:
        raise MethodError(f"{adapter_dir} is a full fine-tune folder without {', '.join(missing_files)}; save it again")
    state = {}
    for name in files:
        state.update(load_file(str(adapter_dir / name), device=str(next(model.parameters()).device)))
    result = model.load_state_dict(state, strict=False)
    tied = tied_names(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise MethodError(f"{adapter_dir} does not fit this base model (missing {missing[:3]}, unexpected "
                          f"{result.unexpected_keys[:3]}): load it on the base it was fine-tuned from")
    model.requires_grad_(is_trainable)
    return _mark(model)


def tied_names(model) -> set[str]:
    """Return parameter names that share storage with an earlier one (saved once, e.g. a tied lm_head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.setdefault(id(param), name)
    return tied


def is_full_model(model) -> bool:
    """Return True for a model that build or load made a full fine-tune (its base weights are gone)."""
    return getattr(getattr(model, "disable_adapter", None), "__func__", None) is _cannot_disable


def _mark(model):
    # Per instance: generate(use_adapter=False) and the contract tests call disable_adapter on any
    # method's model; a full fine-tune must say why it has none rather than quietly use its new weights.
    model.disable_adapter = types.MethodType(_cannot_disable, model)
    return model


def _cannot_disable(model):
    raise MethodError("a full fine-tune has no adapter to disable: its weights replaced the base's. "
                      "To compare with the base, load the base model without --adapter")
