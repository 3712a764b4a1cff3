"""The demo: train the preset on the bundled sample data, then show base and adapter answers side by side."""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

from peftkit.config import load_config


def run_demo(config_path: str, overrides: list[str] | None = None, *, prompts: int = 6, print_fn=print) -> Path:
    """Return the adapter folder after training the demo config and printing held-out comparisons."""
    from peftkit.generate import generate, load_session
    from peftkit.train import train

    cfg = load_config(config_path, overrides)
    result = train(cfg)
    m = result.metrics
    print_fn(f"\ntrained {m['steps']} steps in {m['wall_time_s']:.0f} s: train loss {m['train_loss_first']:.3f} -> "
             f"{m['train_loss']:.3f}, eval loss {m['eval_loss']:.3f}" if m["eval_loss"] is not None else "")

    held_out = held_out_conversations(cfg.data.eval_path, prompts)
    session = load_session(str(result.adapter_dir), dtype=cfg.model.dtype)
    adapter_answers = generate(session, [c[:-1] for c in held_out], max_new_tokens=80)
    base_answers = generate(session, [c[:-1] for c in held_out], max_new_tokens=80, use_adapter=False)
    for conv, base, tuned in zip(held_out, base_answers, adapter_answers):
        print_fn(side_by_side(conv[-2]["content"], base, tuned, conv[-1]["content"]))
    print_fn(f"\nadapter: {result.adapter_dir.resolve()}")
    if result.registry_ref:
        print_fn(f"registry: {result.registry_ref}  (peftkit registry show {result.registry_ref})")
    print_fn(f"try it:  peftkit chat --adapter {result.adapter_dir}")
    return result.adapter_dir


def held_out_conversations(eval_path: str | None, n: int) -> list[list[dict]]:
    """Return the first n held-out conversations, each ending with its reference assistant turn."""
    if not eval_path:
        return []
    rows = []
    for line in Path(eval_path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            messages = json.loads(line)["messages"]
            if messages[-1]["role"] == "assistant":
                rows.append(messages)
        if len(rows) == n:
            break
    return rows


def side_by_side(question: str, base: str, tuned: str, reference: str) -> str:
    """Return a block with the question, then base and adapter answers in two columns."""
    width = max(60, min(shutil.get_terminal_size((120, 20)).columns, 160))
    col = (width - 3) // 2
    left = textwrap.wrap(base, col) or [""]
    right = textwrap.wrap(tuned, col) or [""]
    rows = [f"{a:<{col}} | {b}" for a, b in zip(left + [""] * (len(right) - len(left)), right + [""] * (len(left) - len(right)))]
    head = f"{'BASE MODEL':<{col}} | ADAPTER"
    return "\n".join(["", "=" * width, textwrap.fill("Q: " + question, width), "-" * width, head, "-" * width, *rows,
                      "-" * width, textwrap.fill("reference: " + reference, width)])
