"""A tiny Llama trains on packed batches from our collator through the HF Trainer."""
from __future__ import annotations

import torch
from data_helpers import chat, data_cfg

from peftkit.data import build_collator, prepare

COLOURS = ["red", "blue", "green", "black"]


def test_trainer_learns_from_packed_batches(write, tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    path = write("train.jsonl", [chat(f"Colour of item {i}?", f"Item {i} is {COLOURS[i % 4]}.") for i in range(16)])
    prepared = prepare(data_cfg(path, packing=True, max_seq_length=64, system_prompt="Answer."), tokenizer, progress=False)
    assert prepared.stats["packed_sequences"] < prepared.stats["examples"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=len(tokenizer), attn_implementation="sdpa",
                                         tie_word_embeddings=True))
    collate = build_collator(tokenizer, packing=True, attn_implementation="sdpa")
    eval_batch = collate(list(prepared.train))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def measure() -> tuple[float, float]:
        """Return the mean loss and the mean log-probability of the end-of-turn targets."""
        model.eval()
        with torch.no_grad():
            out = model(**eval_batch)
        targets = eval_batch["labels"][:, 1:]
        logp = out.logits[:, :-1].log_softmax(-1)[..., end][targets == end]
        return out.loss.item(), logp.mean().item()

    loss_before, end_before = measure()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=8,
                             learning_rate=2e-2, warmup_steps=0, logging_steps=2, save_strategy="no", report_to="none",
                             use_cpu=True, seed=0, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=prepared.train, data_collator=collate).train()
    loss_after, end_after = measure()
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    # The end-of-turn token is a trained target, so the model is learning to stop (e^3 = 20x likelier).
    assert end_after > end_before + 3, (end_before, end_after)
