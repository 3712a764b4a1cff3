"""Turn raw rows into examples: a conversation (chat, instruction, completion) or plain text.

instruction and completion rows become a two-turn conversation (user, then assistant) so they are
rendered with the chat template, exactly as a tuned instruct model is prompted at inference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from peftkit.data.errors import DataError
from peftkit.data.readers import Row

# ShareGPT and other common spellings of the four roles a chat template knows.
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "tool": "tool", "function": "tool", "ipython": "tool", "observation": "tool"}


@dataclass
class Example:
    """One training example: `messages` for chat-shaped formats, `text` for raw text."""

    where: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None


def detect_format(fields: dict[str, Any], where: str) -> str:
    """Return the format name whose fields this row has (used by data.format=auto)."""
    if "messages" in fields or "conversations" in fields:
        return "chat"
    if "instruction" in fields and "output" in fields:
        return "instruction"
    if "prompt" in fields and "completion" in fields:
        return "completion"
    if "text" in fields:
        return "text"
    present = ", ".join(sorted(map(str, fields))) or "none"
    raise DataError(f"{where}: cannot tell the data format from the fields ({present}); expected messages or "
                    "conversations (chat), instruction + output, prompt + completion, or text. Set data.format and, "
                    "for other names, data.columns, e.g. data.columns={question: instruction, answer: output}")


def rename_columns(fields: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Return the row with fields renamed by data.columns ({name in the file: name the format expects})."""
    if not columns:
        return fields
    out = {k: v for k, v in fields.items() if k not in columns}
    for source, target in columns.items():
        if source in fields:
            out[target] = fields[source]
    return out


def to_example(row: Row, fmt: str, columns: dict[str, str]) -> Example:
    """Return the row as an Example of format `fmt`, or raise DataError naming the row and the fix."""
    return FORMATS[fmt](rename_columns(row.fields, columns), row.where, columns)


def normalize_messages(value: Any, where: str, key: str = "messages", require_assistant: bool = True) -> list[dict[str, str]]:
    """Return a clean [{role, content}] list from OpenAI-style or ShareGPT-style messages."""
    if isinstance(value, str):
        hint = " (CSV cells are text: keep chat data in JSONL)" if value.lstrip().startswith("[") else ""
        raise DataError(f"{where}: '{key}' must be a list of {{role, content}}, got str{hint}")
    if not isinstance(value, list):
        raise DataError(f"{where}: '{key}' must be a list of {{role, content}}, got {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: '{key}' is an empty list; a conversation needs a user and an assistant turn")
    messages = []
    for i, item in enumerate(value):
        at = f"{where}: {key}[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"{at} must be an object {{role, content}}, got {type(item).__name__}")
        raw_role = item.get("role", item.get("from"))
        if raw_role is None:
            raise DataError(f"{at} has no 'role' (or ShareGPT 'from'); give each turn a role: system, user or assistant")
        role = ROLES.get(str(raw_role).lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise DataError(f"{at}.role={raw_role!r} is unknown; use system, user, assistant or tool "
                            "(ShareGPT: system, human, gpt)")
        content = item.get("content", item.get("value"))
        content = _content_text(content, f"{at} ({role})")
        if not content.strip():
            raise DataError(f"{at} ({role}) has empty content; fill it in or remove the turn")
        messages.append({"role": role, "content": content})
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing in it would be trained; "
                        "add the assistant's reply (or use data.format=text for raw text)")
    return messages


def _content_text(content: Any, at: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise DataError(f"{at} has no 'content' (or ShareGPT 'value'); give the turn its text")
    # OpenAI-style content parts: keep the text parts, refuse anything else (images are not supported).
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise DataError(f"{at} content must be text, got {type(content).__name__}")


def _chat(fields: dict[str, Any], where: str, columns: dict[str, str]) -> Example:
    key = "messages" if "messages" in fields else "conversations" if "conversations" in fields else None
    if key is None:
        _missing(fields, where, "messages", "chat rows need 'messages': [{role, content}, ...] "
                 "(or ShareGPT 'conversations': [{from, value}, ...])", columns)
    return Example(where, messages=normalize_messages(fields[key], where, key))


def _instruction(fields: dict[str, Any], where: str, columns: dict[str, str]) -> Example:
    need = "instruction rows need 'instruction' and 'output' (and optionally 'input', 'system')"
    instruction = _text(fields, "instruction", where, need, columns)
    output = _text(fields, "output", where, need, columns)
    extra = _text(fields, "input", where, need, columns, required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example(where, messages=_with_system(fields, where, need, columns,
                                                [{"role": "user", "content": user}, {"role": "assistant", "content": output}]))


def _completion(fields: dict[str, Any], where: str, columns: dict[str, str]) -> Example:
    need = "completion rows need 'prompt' and 'completion'"
    prompt = _text(fields, "prompt", where, need, columns)
    completion = _text(fields, "completion", where, need, columns)
    return Example(where, messages=_with_system(fields, where, need, columns,
                                                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]))


def _text_format(fields: dict[str, Any], where: str, columns: dict[str, str]) -> Example:
    return Example(where, text=_text(fields, "text", where, "text rows need 'text'", columns))


def _with_system(fields, where, need, columns, messages):
    system = _text(fields, "system", where, need, columns, required=False)
    return ([{"role": "system", "content": system}] if system.strip() else []) + messages


def _text(fields: dict[str, Any], key: str, where: str, need: str, columns: dict[str, str], required: bool = True) -> str:
    value = fields.get(key)
    if value is None:
        if not required:
            return ""
        _missing(fields, where, key, need, columns)
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: '{key}' is empty; fill it in or remove the row")
    return value


def _missing(fields: dict[str, Any], where: str, key: str, need: str, columns: dict[str, str]) -> None:
    present = ", ".join(sorted(map(str, fields))) or "none"
    mapped = [src for src, dst in columns.items() if dst == key]
    how = (f"data.columns maps {mapped[0]} -> {key}, but this row has no {mapped[0]!r}" if mapped
           else f"if it has another name, map it with data.columns, e.g. data.columns={{your_name: {key}}}")
    raise DataError(f"{where}: '{key}' is missing ({need}; fields present: {present}); {how}")


FORMATS: dict[str, Callable[[dict[str, Any], str, dict[str, str]], Example]] = {
    "chat": _chat,
    "instruction": _instruction,
    "completion": _completion,
    "text": _text_format,
}
