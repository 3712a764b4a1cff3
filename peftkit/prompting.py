"""How an adapter was prompted in training, written once into its lineage and read back by one function.

Training records a `prompting` block in the adapter's peftkit.json: the system prompt, the chat
template text it rendered with, and the tokens that end an assistant turn. Generation, chat,
evaluation and serving all call `read_prompting` (then `stop_ids`), so they render prompts and stop
exactly as training did. Adapters saved before this block existed fall back to the data section of
their recorded config and to the chat template of the tokenizer saved beside them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LINEAGE_FILE = "peftkit.json"


@dataclass(frozen=True)
class Prompting:
    """The system prompt, chat template and stop tokens an adapter was trained with."""

    system_prompt: str | None = None
    """Inserted as the first turn when a conversation has no system turn of its own."""
    chat_template: str | None = None
    """The Jinja template text training rendered with; None: the tokenizer's own."""
    stop_tokens: tuple[str, ...] = ()
    """Tokens that end an assistant turn (the template's end-of-turn token, then EOS); empty: derive from the template."""

    def to_dict(self) -> dict[str, Any]:
        """Return the record as written into peftkit.json."""
        return {**asdict(self), "stop_tokens": list(self.stop_tokens)}


def build_prompting(tokenizer: Any, system_prompt: str | None, chat_template: str | None) -> Prompting:
    """Return the Prompting record for training data rendered with this tokenizer and data settings."""
    from peftkit.data.templates import resolve_template, stop_token_ids

    template = resolve_template(tokenizer, chat_template)  # a file path becomes its text: the record stands alone
    stops = stop_token_ids(tokenizer, chat_template=template.text)
    return Prompting(system_prompt, template.text, tuple(tokenizer.convert_ids_to_tokens(stops)))


def read_prompting(folder: str | Path | None, config: dict | None = None) -> Prompting:
    """Return how the adapter in folder was prompted in training (folder None: the base model, prompted plainly).

    config is the run config recorded elsewhere (a registry entry's), used only for adapters older than the record.
    """
    lineage = _read_lineage(Path(folder)) if folder is not None else {}
    record = lineage.get("prompting")
    if isinstance(record, dict):
        return Prompting(record.get("system_prompt"), record.get("chat_template"), tuple(record.get("stop_tokens") or ()))
    data = ((lineage.get("config") or config or {}).get("data") or {})
    template = data.get("chat_template")
    if template and "{{" not in template and "{%" not in template:
        path = Path(template).expanduser()
        template = path.read_text(encoding="utf-8") if path.is_file() else None
    if not template and folder is not None:
        template = _saved_template(Path(folder))
    return Prompting(data.get("system_prompt"), template or None)


def stop_ids(tokenizer: Any, prompting: Prompting) -> list[int]:
    """Return the token ids that end a reply for this tokenizer, as the record names them."""
    if prompting.stop_tokens:
        ids = tokenizer.convert_tokens_to_ids(list(prompting.stop_tokens))
        unknown = getattr(tokenizer, "unk_token_id", None)
        if all(isinstance(i, int) and (i != unknown or unknown is None) for i in ids):
            return list(dict.fromkeys(ids))
    from peftkit.data.templates import stop_token_ids

    return stop_token_ids(tokenizer, chat_template=prompting.chat_template)


def _read_lineage(folder: Path) -> dict:
    path = folder / LINEAGE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _saved_template(folder: Path) -> str | None:
    # Training saves the tokenizer beside the adapter; its template is the one the adapter learned.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, json.JSONDecodeError):
            return None
        return template if isinstance(template, str) else None
    return None
