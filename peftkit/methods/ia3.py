"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning") through peft.

IA3 learns one scaling vector per targeted layer, initialized to ones, so a fresh adapter
changes nothing. Presets follow the paper rather than LoRA's: `attention` (the config's
default) scales keys, values and the input of the MLP's down-projection, as peft does for
Llama; `all-linear` scales every projection; an explicit list is used as given.
"""
from __future__ import annotations

from peftkit.methods.lora import ALL_LINEAR, wrap

PAPER_TARGETS = ["k_proj", "v_proj", "down_proj"]
# The paper rescales the MLP's inner activation: that is the *input* of down_proj.
FEEDFORWARD = ["down_proj"]


def targets(value: str | list[str]) -> tuple[list[str], list[str]]:
    """Return (target modules, the subset scaled on its input) for a preset name or an explicit list."""
    from peftkit.methods.lora import target_modules

    if value == "attention":
        modules = list(PAPER_TARGETS)
    elif value == "all-linear":
        modules = list(ALL_LINEAR)
    else:
        modules = target_modules(value)
    return modules, [m for m in modules if m in FEEDFORWARD]


def build(model, method_cfg):
    """Return the model with IA3 scaling vectors (only they train)."""
    from peft import IA3Config, TaskType

    modules, feedforward = targets(method_cfg.target_modules)
    config = IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=modules, feedforward_modules=feedforward)
    return wrap(model, config, method_cfg.target_modules)
