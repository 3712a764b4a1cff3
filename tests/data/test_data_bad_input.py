"""Bad input: each case stops prepare() with an error naming the file and line, what is wrong and the fix."""
from __future__ import annotations

import json

import pytest
from data_helpers import chat, data_cfg

from peftkit.data import DataError, prepare
from peftkit.errors import PeftkitError

GOOD = json.dumps(chat("Hi", "Hello!"))


def error_of(path, tokenizer, **overrides) -> str:
    with pytest.raises(DataError) as info:
        prepare(data_cfg(path, **overrides), tokenizer, progress=False)
    return str(info.value)


def test_malformed_json_line_names_line_and_column(write, tokenizer):
    path = write("train.jsonl", GOOD + "\n" + '{"messages": [{"role": "user", "content": "Hi"}\n')
    message = error_of(path, tokenizer)
    assert message.startswith(f"{path}:2: not valid JSON (")
    assert "each line must be one complete JSON object" in message


def test_utf8_byte_order_mark_at_start_is_tolerated(write, tokenizer):
    path = write("train.jsonl", b"\xef\xbb\xbf" + (GOOD + "\n" + GOOD + "\n").encode())
    assert prepare(data_cfg(path), tokenizer, progress=False).stats["examples"] == 2


def test_utf16_byte_order_mark_asks_for_utf8(write, tokenizer):
    path = write("train.jsonl", (GOOD + "\n").encode("utf-16"))
    message = error_of(path, tokenizer)
    assert message.startswith(f"{path}:1: starts with a UTF-16 byte-order mark; re-save the file as UTF-8")


def test_byte_order_mark_in_the_middle_names_its_line(write, tokenizer):
    path = write("train.jsonl", (GOOD + "\n" + GOOD + "\n\ufeff" + GOOD + "\n").encode())
    assert error_of(path, tokenizer).startswith(f"{path}:3: a byte-order mark in the middle of the file")


def test_blank_lines_are_tolerated_and_line_numbers_stay_true(write, tokenizer):
    path = write("train.jsonl", f"\n{GOOD}\n\n   \n{GOOD}\n\n")
    assert prepare(data_cfg(path), tokenizer, progress=False).stats["examples"] == 2
    broken = write("broken.jsonl", f"\n{GOOD}\n\n{{oops\n")
    assert error_of(broken, tokenizer).startswith(f"{broken}:4: not valid JSON")


def test_non_utf8_bytes_name_line_byte_and_fix(write, tokenizer):
    path = write("train.jsonl", (GOOD + "\n").encode() + b'{"text": "caf\xe9"}\n')
    message = error_of(path, tokenizer)
    assert message.startswith(f"{path}:2: not valid UTF-8 (byte 0xe9 at column 14)")
    assert "re-save the file as UTF-8" in message


def test_empty_file(write, tokenizer):
    path = write("train.jsonl", b"")
    assert error_of(path, tokenizer) == f"{path}: the file is empty (0 bytes); point data.path at a file with examples"


def test_file_of_only_blank_lines(write, tokenizer):
    path = write("train.jsonl", "\n\n  \n")
    assert error_of(path, tokenizer).startswith(f"{path}: has no rows")


def test_missing_field_names_the_field_and_the_mapping_fix(write, tokenizer):
    path = write("train.jsonl", [{"instruction": "Add 2 and 2", "output": "4"}, {"instruction": "Add 1 and 1", "answer": "2"}])
    message = error_of(path, tokenizer)
    assert message.startswith(f"{path}:2: 'output' is missing (instruction rows need 'instruction' and 'output'")
    assert "fields present: answer, instruction" in message and "data.columns" in message


def test_messages_as_a_string_is_a_wrong_type(write, tokenizer):
    path = write("train.jsonl", [{"messages": "user: Hi / assistant: Hello"}])
    assert error_of(path, tokenizer, format="chat") == f"{path}:1: 'messages' must be a list of {{role, content}}, got str"


def test_unknown_role(write, tokenizer):
    path = write("train.jsonl", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}])
    message = error_of(path, tokenizer)
    assert message.startswith(f"{path}:1: messages[1].role='bot' is unknown; use system, user, assistant or tool")


def test_roles_out_of_order_where_the_template_requires_alternation(write, tokenizer, mistral_template):
    rows = [chat("Hi", "Hello"), {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"},
                                               {"role": "assistant", "content": "Hello"}]}]
    path = write("train.jsonl", rows)
    message = error_of(path, tokenizer, chat_template=mistral_template)
    assert message.startswith(f"{path}:2: the chat template rejected this conversation "
                              "(Conversation roles must alternate user/assistant/user/assistant/...)")
    assert "roles in order: user, user, assistant" in message
    # The same rows are fine for a template without that rule (SmolLM2's ChatML).
    assert prepare(data_cfg(path), tokenizer, progress=False).stats["examples"] == 2


def test_empty_content(write, tokenizer):
    path = write("train.jsonl", [chat("Hi", "Hello"), chat("Hi", "   ")])
    assert error_of(path, tokenizer).startswith(f"{path}:2: messages[1] (assistant) has empty content")


def test_conversation_without_an_assistant_turn(write, tokenizer):
    path = write("train.jsonl", [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}])
    message = error_of(path, tokenizer)
    assert message.startswith(f"{path}:1: the conversation has no assistant turn, so nothing in it would be trained")


def test_unrecognised_fields_with_auto_format(write, tokenizer):
    path = write("train.jsonl", [{"question": "2+2?", "answer": "4"}])
    message = error_of(path, tokenizer)
    assert message.startswith(f"{path}:1: cannot tell the data format from the fields (answer, question)")
    assert "data.columns={question: instruction, answer: output}" in message


def test_missing_file_and_unsupported_type(tmp_path, write, tokenizer):
    assert error_of(tmp_path / "nope.jsonl", tokenizer).startswith(f"{tmp_path / 'nope.jsonl'}: no such file or folder")
    path = write("train.txt", "hello")
    assert error_of(path, tokenizer).startswith(f"{path}: unsupported file type '.txt'")


def test_data_error_is_a_peftkit_error_so_the_cli_prints_one_line():
    assert issubclass(DataError, PeftkitError)
