"""The seed recipe as its users write it: transformers Trainer + peft LoRA, fp32, padded to a fixed length.

    python -m peftkit.bench.recipes.seed --spec SPEC.json --out RESULT.json

Each conversation is rendered with the tokenizer's chat template, tokenized and padded to
max_seq_length, and DataCollatorForLanguageModeling(mlm=False) makes the labels. That collator masks
every pad id, and SmolLM2's tokenizer pads with its end-of-turn token, so this recipe never trains the
model to end an answer (and trains on the prompt too). The bench keeps that on purpose: it is what
the recipe does.
"""
from __future__ import annotations

import sys

from peftkit.bench.recipes import measure
from peftkit.bench.recipes.spec import lora_config, train_conversations, trainer_settings


def train(spec: dict, meter: measure.Meter):
    """Return the model after training the seed recipe for the spec's steps."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    model = get_peft_model(model, lora_config(spec))

    texts = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in train_conversations(spec)]
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], padding="max_length", truncation=True, max_length=spec["max_seq_length"]),
        batched=True, remove_columns=["text"])
    trainer = Trainer(model=model, args=TrainingArguments(**trainer_settings(spec)), train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    meter.attach(trainer, pad_id=tokenizer.pad_token_id)
    trainer.train()
    return model


if __name__ == "__main__":
    sys.exit(measure.main(train))
