"""LoRA and its options (DoRA, rsLoRA), and QLoRA's LoRA-on-4-bit, all through peft."""
from __future__ import annotations

from peftkit.methods.errors import MethodError

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL_LINEAR = ATTENTION + MLP
TARGET_PRESETS = {"attention": ATTENTION, "all-linear": ALL_LINEAR}


def target_modules(value: str | list[str]) -> list[str]:
    """Return the module names for a preset name or an explicit list."""
    if isinstance(value, str):
        if value not in TARGET_PRESETS:
            raise MethodError(f"method.target_modules={value!r} is not a preset; use {' or '.join(TARGET_PRESETS)}, "
                              "or a list such as [q_proj, v_proj]")
        return list(TARGET_PRESETS[value])
    if not value:
        raise MethodError("method.target_modules=[] names no layer; use attention, all-linear or a list such as [q_proj, v_proj]")
    return list(value)


def lora_config(method_cfg, *, use_dora: bool | None = None):
    """Return the peft LoraConfig for the method section."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=method_cfg.rank,
        lora_alpha=method_cfg.alpha,
        lora_dropout=method_cfg.dropout,
        target_modules=target_modules(method_cfg.target_modules),
        use_dora=method_cfg.use_dora if use_dora is None else use_dora,
        use_rslora=method_cfg.use_rslora,
        bias="none",
    )


def build(model, method_cfg):
    """Return the model with LoRA adapters (only they train); a 4-bit base makes this QLoRA."""
    from peft import prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        # Casts norms to fp32 and enables input grads so checkpointed 4-bit layers backpropagate.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return wrap(model, lora_config(method_cfg), method_cfg.target_modules)


def build_dora(model, method_cfg):
    """Return the model with DoRA adapters (method.name=dora is lora with use_dora on)."""
    return wrap(model, lora_config(method_cfg, use_dora=True), method_cfg.target_modules)


def build_qlora(model, method_cfg):
    """Return the 4-bit NF4 base with LoRA adapters on top (the base must already be loaded in 4-bit)."""
    if not getattr(model, "is_loaded_in_4bit", False):
        raise MethodError("method.name='qlora' needs the base loaded in 4-bit NF4: load it with "
                          "peftkit.models.load_base(..., quantize_4bit=True) (peftkit train does), or use method.name=lora")
    return build(model, method_cfg)


def wrap(model, peft_config, targets):
    """Return get_peft_model(model, peft_config), with peft's unknown-module error in our words."""
    from peft import get_peft_model

    from peftkit.methods.dropout import use_byte_dropout
    from peftkit.methods.lora_forward import use_mixed_precision_forward

    try:
        wrapped = get_peft_model(model, peft_config)
    except ValueError as exc:
        if "not found in the base model" not in str(exc) and "Target modules" not in str(exc):
            raise
        raise MethodError(f"method.target_modules={targets!r}: {exc}. Llama layers are named "
                          f"{', '.join(ALL_LINEAR)}; or use a preset: attention, all-linear") from None
    use_byte_dropout(wrapped)
    use_mixed_precision_forward(wrapped)
    return wrapped
