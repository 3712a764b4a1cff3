"""Chat templates: which one applies, rendering a conversation into prompt and reply segments, and the
prompt ids and stop tokens that generation and serving use, so inference sees exactly what training saw.

A conversation is rendered once whole and once per assistant turn up to that turn (with the generation
prompt) and through it. Because each partial rendering must be a prefix of the next, the text splits
cleanly into segments: prompt text, the assistant's reply (ending with the template's end-of-turn
token), prompt text, ... Each segment is tokenized on its own, so a reply's tokens never merge with the
text before it, and a prompt built for generation is tokenized the same way as in training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.data.errors import DataError
from peftkit.data.formats import normalize_messages

log = logging.getLogger(__name__)

# The documented fallback for tokenizers without a chat template: ChatML, the format SmolLM2, Qwen and
# many others use. A turn ends with <|im_end|> when the tokenizer has that token, else with its EOS
# token, so the end of a reply is always one token that generation can stop on.
FALLBACK_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + END_OF_TURN + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_warned: set[str] = set()


@dataclass(frozen=True)
class Template:
    """The Jinja chat template in use and where it came from (tokenizer, data.chat_template or fallback)."""

    text: str
    source: str


def resolve_template(tokenizer: Any, chat_template: str | None = None) -> Template:
    """Return data.chat_template (text or a file), else the tokenizer's own template, else the ChatML fallback."""
    if chat_template:
        looks_like_text = "{{" in chat_template or "{%" in chat_template
        if not looks_like_text:
            path = Path(chat_template).expanduser()
            if not path.is_file():
                raise DataError(f"data.chat_template={chat_template!r} is neither a Jinja template nor an existing file; "
                                "pass the template text or the path to a .jinja file")
            return Template(path.read_text(encoding="utf-8"), f"data.chat_template ({path})")
        return Template(chat_template, "data.chat_template")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the unnamed one is "default"
        own = own.get("default")
    if own:
        return Template(own, "tokenizer")
    end = "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token
    if not end:
        raise DataError("the tokenizer has no chat template and no EOS token, so replies could not end; "
                        "set data.chat_template to a Jinja chat template")
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if name not in _warned:
        _warned.add(name)
        log.warning("tokenizer %s has no chat template; using the ChatML fallback with %s ending each turn "
                    "(set data.chat_template to choose another)", name, end)
    return Template(FALLBACK_TEMPLATE.replace("END_OF_TURN", repr(end)), "fallback (ChatML)")


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Return the messages with system_prompt put first when the conversation has no system turn."""
    if system_prompt and messages and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render(tokenizer: Any, template: Template, messages: list[dict[str, str]], add_generation_prompt: bool, where: str) -> str:
    """Return the template's text for these messages; a template's own refusal becomes a DataError."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template.text, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(f"{where}: the chat template rejected this conversation ({exc}); roles in order: {roles}. "
                        "Reorder or merge turns (many templates need user and assistant to alternate after an "
                        "optional system turn), or set data.chat_template") from None
    return text


def render_segments(tokenizer: Any, template: Template, messages: list[dict[str, str]], add_generation_prompt: bool,
                    where: str) -> list[tuple[str, bool]]:
    """Return the rendered conversation as (text, is_reply) segments; reply segments are assistant turns."""
    full = render(tokenizer, template, messages, add_generation_prompt, where)
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{where}: the conversation starts with an assistant turn; put the user's message first")
        before = render(tokenizer, template, messages[:i], True, where)
        through = render(tokenizer, template, messages[: i + 1], False, where)
        if not (full.startswith(through) and through.startswith(before) and len(before) >= cursor):
            raise DataError(f"{where}: the chat template renders turn {i} ({message['role']}) differently once later "
                            "turns follow, so the reply's tokens cannot be located; use a template that renders earlier "
                            "turns unchanged (set data.chat_template)")
        if len(before) > cursor:
            segments.append((full[cursor:len(before)], False))
        segments.append((full[len(before):len(through)], True))
        cursor = len(through)
    if cursor < len(full):
        segments.append((full[cursor:], False))
    return segments


def tokenize_segments(tokenizer: Any, segments: list[list[tuple[str, bool]]]) -> list[list[list[int]]]:
    """Return token ids per segment, tokenizing every segment of every conversation in one batch call."""
    flat = [text for conversation in segments for text, _ in conversation]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, k = [], 0
    for conversation in segments:
        out.append(ids[k:k + len(conversation)])
        k += len(conversation)
    return out


def build_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], system_prompt: str | None = None,
                     chat_template: str | None = None) -> list[int]:
    """Return the token ids of a conversation ending with the assistant generation prompt, as in training."""
    clean = with_system(normalize_messages(messages, "messages", require_assistant=False), system_prompt)
    template = resolve_template(tokenizer, chat_template)
    segments = render_segments(tokenizer, template, clean, True, "messages")
    return [t for ids in tokenize_segments(tokenizer, [segments])[0] for t in ids]


def stop_token_ids(tokenizer: Any, chat_template: str | None = None) -> list[int]:
    """Return the ids that end an assistant turn (the template's end-of-turn token) plus the EOS id."""
    template = resolve_template(tokenizer, chat_template)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    segments = render_segments(tokenizer, template, probe, False, "stop_token_ids")
    reply = next(ids for ids, (_, is_reply) in zip(tokenize_segments(tokenizer, [segments])[0], segments) if is_reply)
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    stops = []
    trained = reply[: reply_length(tokenizer, reply)]
    if trained and trained[-1] in special:
        stops.append(trained[-1])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    return stops


def reply_length(tokenizer: Any, reply_ids: list[int]) -> int:
    """Return how many of a reply's tokens are trained: all but trailing whitespace after the end-of-turn token."""
    end = len(reply_ids)
    # The newline a template writes after <|im_end|> is layout, not something the model must learn to say;
    # generation stops at the end-of-turn token before it.
    while end > 0 and tokenizer.decode([reply_ids[end - 1]]).strip() == "":
        end -= 1
    return end
