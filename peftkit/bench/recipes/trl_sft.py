"""TRL's SFTTrainer: LoRA, packed (or padding-free) batches, loss on the assistant turns only.

    python -m peftkit.bench.recipes.trl_sft --spec SPEC.json --out RESULT.json

With data.packing on, TRL packs conversations into rows of max_seq_length (best-fit decreasing,
padding-free); with it off, each batch's conversations are laid end to end without padding. Either
way the batch counts what peftkit's does. assistant_only_loss needs `{% generation %}` markers in
the chat template; TRL patches the templates it knows, and for other ChatML templates (SmolLM2's)
the recipe adds the markers itself, as TRL's error message asks, after checking that the marked
template renders every training conversation exactly as the tokenizer's own does. bf16 when the
machine multiplies bf16 fast (peftkit.models.resolve_dtype("auto")), else fp32.
"""
from __future__ import annotations

import json
import sys

from peftkit.bench.recipes import measure
from peftkit.bench.recipes.spec import lora_config, train_conversations, trainer_settings

# ChatML with the reply and its end-of-turn token inside the generation block (the newline after it is
# prompt text, as in peftkit's labels). DEFAULT_SYSTEM is what the tokenizer's template puts first when
# a conversation has no system turn (SmolLM2's names itself; others put nothing).
MARKED_CHATML = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}{{ DEFAULT_SYSTEM }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train(spec: dict, meter: measure.Meter):
    """Return the model after training TRL's SFTTrainer for the spec's steps."""
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError as exc:
        raise measure.RecipeSkipped(f"trl cannot be imported ({exc}); pip install 'trl==1.16.0'") from None
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    conversations = train_conversations(spec)
    tokenizer.chat_template = training_template(tokenizer, conversations)
    bf16 = spec["dtype"] == "bf16"
    args = SFTConfig(
        **trainer_settings(spec),
        bf16=bf16,  # TRL's default is True; fp32 where bf16 is emulated
        model_init_kwargs={"dtype": "bfloat16" if bf16 else "float32"},
        packing=spec["packing"],
        padding_free=not spec["packing"],  # packing (bfd) is padding-free already
        max_length=spec["max_seq_length"] if spec["packing"] else None,  # TRL refuses a max_length when padding-free alone
        pad_to_multiple_of=None,
        assistant_only_loss=True,
    )
    trainer = SFTTrainer(model=spec["model_dir"], args=args, train_dataset=Dataset.from_list([{"messages": c} for c in conversations]),
                         processing_class=tokenizer, peft_config=lora_config(spec))
    meter.attach(trainer, pad_id=None)  # padding-free batches carry no padding
    trainer.train()
    return trainer.model


def training_template(tokenizer, conversations: list[list[dict[str, str]]]) -> str:
    """Return a chat template with generation markers that renders the conversations as the tokenizer's own does."""
    from trl.chat_template_utils import get_training_chat_template

    try:
        return get_training_chat_template(tokenizer) or tokenizer.chat_template
    except ValueError:
        pass  # TRL has no patch for this template
    own = tokenizer.chat_template
    if not isinstance(own, str) or "<|im_start|>" not in own:
        raise measure.RecipeSkipped("assistant_only_loss needs {% generation %} markers in the chat template, TRL has "
                                    "no patch for this one and it is not ChatML")
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    default_system = probe[:probe.index("<|im_start|>user")]
    marked = MARKED_CHATML.replace("DEFAULT_SYSTEM", json.dumps(default_system))
    for i, messages in enumerate(conversations):
        if (tokenizer.apply_chat_template(messages, tokenize=False, chat_template=marked)
                != tokenizer.apply_chat_template(messages, tokenize=False)):
            raise measure.RecipeSkipped(f"training row {i + 1}: the ChatML template with generation markers renders it "
                                        "differently from the tokenizer's own template")
    return marked


if __name__ == "__main__":
    sys.exit(measure.main(train))
