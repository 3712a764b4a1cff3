"""The spec every recipe reads, turned into what the libraries take: LoRA config, Trainer settings, rows.

The spec is plain JSON written by `peftkit.bench.train_bench`: model_dir, train_file, eval_file
(JSON lines of {"messages": [...]}), system_prompt, max_seq_length, packing, lora {rank, alpha,
dropout, target_modules}, steps, batch_size, gradient_accumulation_steps, learning_rate, lr_scheduler,
warmup_ratio, weight_decay, max_grad_norm, optimizer, gradient_checkpointing, logging_steps, seed,
dtype (fp32 or bf16), output_dir, and for peftkit config_file.
"""
from __future__ import annotations

import json
from pathlib import Path


def lora_config(spec: dict):
    """Return the peft LoraConfig every LoRA recipe trains with."""
    from peft import LoraConfig, TaskType

    lora = spec["lora"]
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=list(lora["target_modules"]), bias="none")


def trainer_settings(spec: dict) -> dict:
    """Return TrainingArguments keywords for the shared budget (SFTConfig takes the same ones)."""
    import torch

    return dict(
        output_dir=spec["output_dir"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["gradient_accumulation_steps"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type=spec["lr_scheduler"],
        warmup_steps=spec["warmup_ratio"],  # transformers 5 reads a float < 1 as a ratio of the total steps
        weight_decay=spec["weight_decay"],
        max_grad_norm=spec["max_grad_norm"],
        optim=spec["optimizer"],
        activation_checkpointing=spec["gradient_checkpointing"],  # transformers 5 name of gradient checkpointing
        logging_steps=spec["logging_steps"],
        seed=spec["seed"],
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )


def train_conversations(spec: dict) -> list[list[dict[str, str]]]:
    """Return the training conversations, each with the spec's system prompt first (as peftkit renders them)."""
    from peftkit.data.templates import with_system

    lines = Path(spec["train_file"]).read_text(encoding="utf-8").splitlines()
    return [with_system(json.loads(line)["messages"], spec["system_prompt"]) for line in lines if line.strip()]
