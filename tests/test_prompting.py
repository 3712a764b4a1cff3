"""One prompting record: training writes it into peftkit.json; generation, chat and serving read it back the same way."""
from __future__ import annotations

import json

from peftkit.cli import main
from peftkit.prompting import Prompting, build_prompting, read_prompting, stop_ids

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_training_records_how_it_prompted_even_from_a_template_file(tiny_overrides, tmp_path):
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE)
    sets = tiny_overrides + ["train.max_steps=1", "data.system_prompt=You are terse.",
                             f"data.chat_template={template_file}"]
    assert main(["train", "configs/demo/fernhill.yaml", *sum([["--set", o] for o in sets], [])]) == 0
    adapter = tmp_path / "run" / "adapter"
    record = json.loads((adapter / "peftkit.json").read_text())["prompting"]
    assert record["system_prompt"] == "You are terse." and record["chat_template"] == TEMPLATE
    assert record["stop_tokens"][0] == "<|im_end|>"  # the template's end-of-turn token, then EOS if it differs
    template_file.unlink()  # the record stands alone: the file it came from may be gone
    prompting = read_prompting(adapter)
    assert prompting == Prompting("You are terse.", TEMPLATE, tuple(record["stop_tokens"]))


def test_record_stop_tokens_equal_what_the_template_ends_a_turn_with(bundled_dir):
    from transformers import AutoTokenizer

    from peftkit.data import stop_token_ids

    tok = AutoTokenizer.from_pretrained(bundled_dir)
    record = build_prompting(tok, "Be brief.", None)
    assert record.chat_template == tok.chat_template  # None means the tokenizer's own, written out as text
    assert "<|im_end|>" in record.stop_tokens
    assert stop_ids(tok, record) == stop_token_ids(tok)
    # A record without stop tokens (or naming tokens this tokenizer lacks) derives them from the template.
    assert stop_ids(tok, Prompting(None, record.chat_template)) == stop_token_ids(tok)
    assert stop_ids(tok, Prompting(None, record.chat_template, ("<|no-such-token|>",))) == stop_token_ids(tok)


def test_adapters_older_than_the_record_fall_back_to_their_config_and_saved_tokenizer(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "peftkit.json").write_text(json.dumps({"config": {"data": {"system_prompt": "Old.", "chat_template": None}}}))
    (old / "chat_template.jinja").write_text(TEMPLATE)
    assert read_prompting(old) == Prompting("Old.", TEMPLATE)
    # A registry entry's config serves when the folder holds no lineage; a template path that is gone is ignored.
    bare = tmp_path / "bare"
    bare.mkdir()
    config = {"data": {"system_prompt": "Entry.", "chat_template": str(tmp_path / "gone.jinja")}}
    assert read_prompting(bare, config) == Prompting("Entry.", None)
    assert read_prompting(None) == Prompting()
