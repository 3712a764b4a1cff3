"""Small helpers shared by the data tests (imported as `data_helpers`; pytest puts this folder on sys.path)."""
from __future__ import annotations


def chat(user: str, reply: str, *more: str) -> dict:
    """Return a chat row: user, assistant, then alternating user/assistant turns from `more`."""
    turns = [user, reply, *more]
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]}


def trained_text(tokenizer, ids, labels) -> list[str]:
    """Return the decoded runs of trained tokens, in order."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def data_cfg(path, **overrides):
    """Return a DataConfig for one file with no eval hold-out (tests set what they check)."""
    from peftkit.config import DataConfig

    return DataConfig(path=str(path), **{"eval_fraction": 0.0, **overrides})
