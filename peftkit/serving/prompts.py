"""Prompt token ids for chat and completion requests, rendered the way the adapter was trained.

Sizes are checked before any work (a conversation of 10,000 turns is refused before its template runs),
the chat template is rendered once, outside the tokenizer lock, and only tokenizing holds the lock.
Training renders and tokenizes a conversation segment by segment so that reply tokens can be masked
(peftkit.data.templates); a prompt for generation has no reply to mask, so it is rendered once and
tokenized whole. Where a template ends each turn with a special token (ChatML, Llama 3 and the like),
these are the ids training saw for the same conversation (a test holds us to it).
"""
from __future__ import annotations

import threading
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.serving.errors import InvalidRequestError

__all__ = ["chat_prompt_ids", "completion_prompt_ids", "check_chat_size", "check_unicode"]


def chat_prompt_ids(tokenizer: Any, lock: threading.Lock, messages: list[dict[str, Any]], system_prompt: str | None,
                    chat_template: str | None, *, max_messages: int, max_chars: int) -> list[int]:
    """Return the ids of a conversation ending with the assistant's generation prompt, as in training."""
    check_chat_size(messages, system_prompt, max_messages, max_chars)
    text = render_chat(tokenizer, messages, system_prompt, chat_template)
    with lock:
        return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_chat_size(messages: list[dict[str, Any]], system_prompt: str | None, max_messages: int, max_chars: int) -> None:
    """Raise InvalidRequestError when a conversation has more messages or characters than the server takes."""
    if len(messages) > max_messages:
        raise InvalidRequestError(f"messages: {len(messages)} messages are more than this server takes (max_messages="
                                  f"{max_messages}); send fewer turns", param="messages")
    chars = len(system_prompt or "") + sum(len(_text_of(m)) for m in messages)
    if chars > max_chars:
        raise InvalidRequestError(f"messages: the conversation holds {chars} characters, more than this server takes "
                                  f"(max_prompt_chars={max_chars}); shorten it", param="messages")
    for i, message in enumerate(messages):
        check_unicode(_text_of(message), f"messages[{i}].content")


def check_unicode(text: str, where: str) -> None:
    """Raise InvalidRequestError when text holds a lone UTF-16 surrogate: JSON's \\ud800 escapes decode to one, and
    no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise InvalidRequestError(f"{where}: holds an unpaired surrogate (\\u{ord(bad):04x} at character {exc.start}), "
                                  "which is not a Unicode character; send valid text", param=where) from None


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], system_prompt: str | None, chat_template: str | None) -> str:
    """Return the conversation rendered once by the adapter's chat template, with the assistant's generation prompt."""
    from peftkit.data.formats import normalize_messages
    from peftkit.data.templates import render, resolve_template, with_system

    try:
        clean = with_system(normalize_messages(messages, "messages", require_assistant=False), system_prompt)
        return render(tokenizer, resolve_template(tokenizer, chat_template), clean, True, "messages")
    except PeftkitError as exc:
        raise InvalidRequestError(str(exc), param="messages") from None
    except Exception as exc:  # noqa: BLE001 - a template's own code (arithmetic, filters) failing on this content
        raise InvalidRequestError(f"messages: the chat template failed on this conversation ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}); change the messages", param="messages") from None


def completion_prompt_ids(tokenizer: Any, lock: threading.Lock, prompt: str | list[int], vocab_size: int,
                          max_chars: int) -> list[int]:
    """Return the ids of a raw completion prompt (text is tokenized as is; token ids are checked)."""
    if isinstance(prompt, str):
        if len(prompt) > max_chars:
            raise InvalidRequestError(f"prompt: {len(prompt)} characters are more than this server takes "
                                      f"(max_prompt_chars={max_chars}); shorten it", param="prompt")
        check_unicode(prompt, "prompt")
        with lock:
            return tokenizer(prompt)["input_ids"]
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary (0 to {vocab_size - 1})", param="prompt")
    return list(prompt)


def _text_of(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else str(content or "")
