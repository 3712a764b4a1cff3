"""Token ids and labels for examples: loss on assistant replies (every turn, each with its end-of-turn
token), or on everything with train_on_inputs; raw text is trained on whole and ends with EOS.

Labels are aligned with input_ids (the model shifts them). labels[0] is always -100: no token comes
before it, so it is never predicted in an unpacked sequence, and masking it keeps a packed sequence
from predicting one example's first token from the end of the previous one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftkit.data.formats import Example
from peftkit.data.templates import Template, render_segments, reply_length, tokenize_segments, with_system

IGNORE = -100
CHUNK = 512  # examples per batched tokenizer call: large enough to use the fast tokenizer's threads


@dataclass
class Encoded:
    """One tokenized example and where it came from."""

    where: str
    input_ids: list[int]
    labels: list[int]


def encode_examples(tokenizer: Any, examples: list[Example], template: Template, *, system_prompt: str | None = None,
                    train_on_inputs: bool = False, progress: bool = True, desc: str = "tokenizing") -> list[Encoded]:
    """Return every example tokenized with its labels, in order, with a progress bar while it works."""
    from tqdm.auto import tqdm

    out: list[Encoded] = []
    with tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress, leave=False) as bar:
        for start in range(0, len(examples), CHUNK):
            chunk = examples[start:start + CHUNK]
            chats = [e for e in chunk if e.messages is not None]
            texts = [e for e in chunk if e.messages is None]
            encoded = {id(e): enc for e, enc in zip(chats, _encode_chats(tokenizer, chats, template, system_prompt, train_on_inputs))}
            encoded.update({id(e): enc for e, enc in zip(texts, _encode_texts(tokenizer, texts))})
            out.extend(encoded[id(e)] for e in chunk)
            bar.update(len(chunk))
    return out


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]], template: Template, *,
                        system_prompt: str | None = None, train_on_inputs: bool = False, where: str = "messages") -> Encoded:
    """Return one conversation's ids and labels (the same path prepare() takes)."""
    return _encode_chats(tokenizer, [Example(where, messages=messages)], template, system_prompt, train_on_inputs)[0]


def _encode_chats(tokenizer, examples, template, system_prompt, train_on_inputs) -> list[Encoded]:
    segments = [render_segments(tokenizer, template, with_system(e.messages, system_prompt), False, e.where)
                for e in examples]
    out = []
    for example, segs, seg_ids in zip(examples, segments, tokenize_segments(tokenizer, segments)):
        ids: list[int] = []
        labels: list[int] = []
        for (_, is_reply), part in zip(segs, seg_ids):
            ids.extend(part)
            if train_on_inputs:
                labels.extend(part)
            elif is_reply:
                n = reply_length(tokenizer, part)
                labels.extend(part[:n] + [IGNORE] * (len(part) - n))
            else:
                labels.extend([IGNORE] * len(part))
        out.append(_finish(example.where, ids, labels))
    return out


def _encode_texts(tokenizer, examples) -> list[Encoded]:
    if not examples:
        return []
    batch = tokenizer([e.text for e in examples], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for example, ids in zip(examples, batch):
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)  # so the model learns where a document ends
        out.append(_finish(example.where, ids, list(ids)))
    return out


def _finish(where: str, ids: list[int], labels: list[int]) -> Encoded:
    if labels:
        labels[0] = IGNORE
    return Encoded(where, ids, labels)
