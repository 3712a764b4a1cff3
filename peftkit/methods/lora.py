"""LoRA and its options (DoRA, rsLoRA), and QLoRA's LoRA-on-4-bit, all through peft."""
from __future__ import annotations

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]
TARGET_PRESETS = {"attention": ATTENTION, "all-linear": ALL_LINEAR}


def target_modules(value: str | list[str]) -> list[str]:
    """Return the module names for a preset name or an explicit list."""
    return TARGET_PRESETS[value] if isinstance(value, str) else list(value)


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
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        # Casts norms to fp32 and enables input grads so checkpointed 4-bit layers backpropagate.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config(method_cfg))


def build_dora(model, method_cfg):
    """Return the model with DoRA adapters (method.name=dora is lora with use_dora on)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(method_cfg, use_dora=True))
