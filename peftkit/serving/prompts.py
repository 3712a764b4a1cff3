"""Prompt token ids for chat and completion requests, rendered the way the adapter was trained."""
from __future__ import annotations

from typing import Any

from peftkit.data import build_prompt_ids
from peftkit.serving.errors import InvalidRequestError

__all__ = ["chat_prompt_ids", "completion_prompt_ids"]


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], system_prompt: str | None,
                    chat_template: str | None) -> list[int]:
    """Return the ids of a conversation ending with the assistant's generation prompt, as in training."""
    from peftkit.errors import PeftkitError

    try:
        return build_prompt_ids(tokenizer, messages, system_prompt=system_prompt, chat_template=chat_template)
    except PeftkitError as exc:
        raise InvalidRequestError(str(exc), param="messages") from None


def completion_prompt_ids(tokenizer: Any, prompt: str | list[int], vocab_size: int) -> list[int]:
    """Return the ids of a raw completion prompt (text is tokenized as is; token ids are checked)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary (0 to {vocab_size - 1})", param="prompt")
    return list(prompt)
