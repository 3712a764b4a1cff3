"""Packing: examples share a sequence but never attend to each other, and the loss is unchanged."""
from __future__ import annotations

import json

import pytest
import torch
from data_helpers import chat, data_cfg

from peftkit.data import DataError, build_collator, prepare
from peftkit.data.packing import pack, split_packed

ROWS = [chat(f"Question number {i}?", "Answer " + "and more " * (i % 5), "Why?", f"Because {i}.") for i in range(12)]


@pytest.fixture(scope="module")
def prepared_pair(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("pack") / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS), encoding="utf-8")
    packed = prepare(data_cfg(path, packing=True, max_seq_length=256), tokenizer, progress=False, use_cache=False)
    plain = prepare(data_cfg(path, packing=False, max_seq_length=256), tokenizer, progress=False, use_cache=False)
    return packed, plain


def tiny_llama(vocab: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, attn_implementation=attn)
    return LlamaForCausalLM(config).float().eval()


def test_pack_fills_sequences_without_overflow():
    lengths = [90, 60, 50, 40, 30, 20, 10, 100]
    groups = pack(lengths, capacity=100, seed=0)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert all(sum(lengths[i] for i in g) <= 100 for g in groups) and len(groups) == 4  # 400 tokens, perfectly packed


def test_packed_rows_hold_the_same_examples_with_restarting_positions(prepared_pair):
    packed, plain = prepared_pair
    assert packed.stats["packed_sequences"] == len(packed.train) < len(plain.train) == 12
    inside = []
    for row in packed.train:
        assert len(row["input_ids"]) <= 256
        for start, end in split_packed(row["position_ids"]):
            assert row["position_ids"][start:end] == list(range(end - start))
            assert row["labels"][start] == -100  # never predicted from the previous example
            inside.append((row["input_ids"][start:end], row["labels"][start:end]))
    assert sorted(inside) == sorted(zip(plain.train["input_ids"], plain.train["labels"]))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_and_loss_equal_unpacked(prepared_pair, tokenizer, attn):
    packed, plain = prepared_pair
    model = tiny_llama(len(tokenizer), attn)
    collate_packed = build_collator(tokenizer, packing=True, attn_implementation=attn)
    collate_plain = build_collator(tokenizer, packing=False)
    with torch.no_grad():
        out = model(**collate_packed(list(packed.train)))
        unpacked_loss = model(**collate_plain(list(plain.train))).loss
        worst = 0.0
        for b, row in enumerate(packed.train):
            for start, end in split_packed(row["position_ids"]):
                alone = model(input_ids=torch.tensor([row["input_ids"][start:end]])).logits[0]
                worst = max(worst, (out.logits[b, start:end] - alone).abs().max().item())
    assert worst < 1e-4, f"an example's logits changed inside a pack by {worst}"
    assert out.loss.item() == pytest.approx(unpacked_loss.item(), rel=1e-5)


def test_a_plain_causal_mask_would_leak(prepared_pair, tokenizer):
    # Control: same rows and reset positions, but a plain causal mask: later examples see earlier ones.
    packed, _ = prepared_pair
    model = tiny_llama(len(tokenizer), "sdpa")
    batch = build_collator(tokenizer, packing=True)(list(packed.train))
    width = batch["input_ids"].shape[1]
    batch["attention_mask"] = torch.ones((width, width), dtype=torch.bool).tril().expand(len(packed.train), 1, width, width)
    worst = 0.0
    with torch.no_grad():
        logits = model(**batch).logits
        for b, row in enumerate(packed.train):
            for start, end in split_packed(row["position_ids"]):
                alone = model(input_ids=torch.tensor([row["input_ids"][start:end]])).logits[0]
                worst = max(worst, (logits[b, start:end] - alone).abs().max().item())
    assert worst > 0.1


def test_collator_outputs(tokenizer):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2]},
            {"input_ids": [8, 9, 10, 11], "labels": [-100, 9, -100, 11], "position_ids": [0, 1, 0, 1]}]
    batch = build_collator(tokenizer, packing=True, pad_to_multiple_of=8)(rows)
    assert batch["input_ids"].shape == (2, 8) and batch["labels"][0, 3:].eq(-100).all()
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 0, 1, 2, 3]
    mask = batch["attention_mask"][1, 0]
    assert mask.dtype == torch.bool and mask[3].tolist() == [False, False, True, True, False, False, False, False]
    eager = build_collator(tokenizer, packing=True, attn_implementation="eager")(rows)["attention_mask"]
    assert eager.dtype == torch.float32 and eager[1, 0, 3, 1] == torch.finfo(torch.float32).min and eager[1, 0, 3, 2] == 0
    flat = build_collator(tokenizer, packing=True, attn_implementation="flash_attention_2")(rows)
    assert "attention_mask" not in flat and flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]


def test_collator_refuses_packed_rows_without_packing(tokenizer):
    with pytest.raises(DataError, match="these rows are packed .* but the collator was built with packing=False"):
        build_collator(tokenizer)([{"input_ids": [1, 2], "labels": [-100, 2], "position_ids": [0, 0]}])
    with pytest.raises(DataError, match="data.packing=true works with model.attn_implementation sdpa, eager"):
        build_collator(tokenizer, packing=True, attn_implementation="flex_attention")
