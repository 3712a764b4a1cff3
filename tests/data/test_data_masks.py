"""Loss masks from token positions: every assistant turn with its end-of-turn token, nothing else."""
from __future__ import annotations

import logging

import pytest
from data_helpers import chat, trained_text

from peftkit.data import DataError, build_prompt_ids, stop_token_ids
from peftkit.data.masks import encode_conversation
from peftkit.data.templates import resolve_template

CONVERSATION = chat("What is 2+2?", "It is 4.", "And 3+3?", "It is 6.")["messages"]


def encode(tokenizer, messages=CONVERSATION, chat_template=None, **kw):
    e = encode_conversation(tokenizer, messages, resolve_template(tokenizer, chat_template), **kw)
    return e.input_ids, e.labels


def test_every_assistant_turn_is_trained_with_its_end_token_but_not_the_newline(tokenizer):
    ids, labels = encode(tokenizer)
    assert trained_text(tokenizer, ids, labels) == ["It is 4.<|im_end|>", "It is 6.<|im_end|>"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for i, token in enumerate(ids):
        if token == end and labels[i] == end:  # each trained end-of-turn token is followed by an untrained newline
            assert ids[i + 1:i + 2] == newline and labels[i + 1] == -100
    assert sum(1 for t, lab in zip(ids, labels) if t == end and lab == end) == 2


def test_end_of_turn_survives_when_it_is_also_the_pad_token(raw_tokenizer):
    from peftkit.data import build_collator

    assert raw_tokenizer.pad_token == raw_tokenizer.eos_token == "<|im_end|>"
    ids, labels = encode(raw_tokenizer)
    batch = build_collator(raw_tokenizer)([{"input_ids": ids, "labels": labels}, {"input_ids": ids[:5], "labels": labels[:5]}])
    end = raw_tokenizer.eos_token_id
    assert (batch["labels"][0] == end).sum().item() == 2  # not masked as padding
    assert (batch["labels"][1, 5:] == -100).all() and (batch["attention_mask"][1, 5:] == 0).all()


def test_training_ids_match_the_stock_chat_template_tokenization(tokenizer):
    ids, _ = encode(tokenizer)
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]


def test_each_reply_follows_exactly_the_tokens_generation_prompts_with(tokenizer, llama3_tokenizer):
    # Replies are tokenized apart from the prompt before them. With a GPT-2 style tokenizer under Llama 3.1's
    # template, "<|end_header_id|>\n\nIt" tokenized whole gives "\n","\n","It", but a prompt ending in
    # "\n\n" gives one "\n\n" token: training must see what generation will see.
    for tok in (tokenizer, llama3_tokenizer):
        ids, labels = encode(tok)
        stock = tok.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, tokenize=True)["input_ids"]
        assert ids[:len(stock)] == stock
        for turn in (1, 3):
            prompt = build_prompt_ids(tok, CONVERSATION[:turn])
            assert ids[:len(prompt)] == prompt
            assert labels[len(prompt) - 1] == -100 and labels[len(prompt)] != -100


def test_prompt_ids_for_generation_equal_the_training_prefix(tokenizer):
    ids, labels = encode(tokenizer)
    prompt = build_prompt_ids(tokenizer, CONVERSATION[:3])
    assert ids[:len(prompt)] == prompt
    assert labels[len(prompt) - 1] == -100 and labels[len(prompt)] != -100  # generation starts where training does
    assert tokenizer.decode(prompt).endswith("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")


def test_stop_tokens(tokenizer, llama3_tokenizer):
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]  # it is also EOS
    assert llama3_tokenizer.convert_ids_to_tokens(stop_token_ids(llama3_tokenizer)) == ["<|eot_id|>", "<|end_of_text|>"]


def test_llama31_template_renders_and_masks_like_meta_documents(llama3_tokenizer):
    tok = llama3_tokenizer
    messages = [{"role": "system", "content": "System message"}, *CONVERSATION]
    ids, labels = encode(tok, messages)
    assert tok.decode(ids).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nSystem message<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "What is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nIt is 4.<|eot_id|>")
    assert trained_text(tok, ids, labels) == ["It is 4.<|eot_id|>", "It is 6.<|eot_id|>"]
    prompt = build_prompt_ids(tok, messages[:2])
    assert tok.decode(prompt).endswith("What is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ids[:len(prompt)] == prompt


def test_train_on_inputs_trains_everything_but_the_first_token(tokenizer):
    ids, labels = encode(tokenizer, train_on_inputs=True)
    assert labels == [-100] + ids[1:]


def test_system_prompt_goes_first_only_when_there_is_none(tokenizer):
    ids, labels = encode(tokenizer, system_prompt="You answer in French.")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou answer in French.<|im_end|>") and "SmolLM" not in text
    assert trained_text(tokenizer, ids, labels) == ["It is 4.<|im_end|>", "It is 6.<|im_end|>"]
    own = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    assert tokenizer.decode(encode(tokenizer, own, system_prompt="ignored")[0]).startswith("<|im_start|>system\nBe brief.")
    assert build_prompt_ids(tokenizer, CONVERSATION[:1], system_prompt="You answer in French.") == ids[:len(
        build_prompt_ids(tokenizer, CONVERSATION[:1], system_prompt="You answer in French."))]


def test_fallback_template_when_the_tokenizer_has_none(bundled_dir, caplog):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_dir)
    tok.chat_template = None
    with caplog.at_level(logging.WARNING):
        ids, labels = encode(tok)
        encode(tok)
    assert [r.getMessage() for r in caplog.records].count(
        f"tokenizer {tok.name_or_path} has no chat template; using the ChatML fallback with <|im_end|> ending each turn "
        "(set data.chat_template to choose another)") == 1
    assert tok.decode(ids).startswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4.")
    assert trained_text(tok, ids, labels) == ["It is 4.<|im_end|>", "It is 6.<|im_end|>"]
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_mistral_template_trains_reply_and_eos_not_the_trailing_space(tokenizer, mistral_template):
    ids, labels = encode(tokenizer, chat_template=mistral_template)
    eos = tokenizer.eos_token
    assert trained_text(tokenizer, ids, labels) == [f"It is 4.{eos}", f"It is 6.{eos}"]
    assert tokenizer.decode(ids).endswith(f"[INST] And 3+3? [/INST]It is 6.{eos} ")


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # Renders only the latest assistant turn, like templates that drop earlier reasoning: positions would lie.
    template = ("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}"
                "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match=r"^messages: the chat template renders turn 1 \(assistant\) differently once later "
                                        r"turns follow"):
        encode(tokenizer, chat_template=template)


def test_chat_template_from_a_file_and_a_missing_file(tmp_path, tokenizer, mistral_template):
    path = tmp_path / "t.jinja"
    path.write_text(mistral_template, encoding="utf-8")
    assert resolve_template(tokenizer, str(path)).text == mistral_template
    with pytest.raises(DataError, match="data.chat_template='nope.jinja' is neither a Jinja template nor an existing file"):
        resolve_template(tokenizer, "nope.jinja")


def test_build_prompt_ids_checks_messages_like_training_does(tokenizer):
    with pytest.raises(DataError, match=r"^messages: messages\[0\].role='robot' is unknown"):
        build_prompt_ids(tokenizer, [{"role": "robot", "content": "Hi"}])
