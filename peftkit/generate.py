"""Generation with a base model and an optional adapter, rendered exactly as training rendered it.

The prompt goes through data.build_prompt_ids with the run's own system prompt and chat
template, and generation stops on the same end-of-turn tokens the adapter was trained to emit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch



@dataclass
class Session:
    """A loaded model ready to answer: the model, its tokenizer and the training-time chat settings."""

    model: object
    """The base with the adapter attached (or a full fine-tune, or the base alone), in eval mode."""
    tokenizer: object
    base_model: str
    """The base model's name as training recorded it (alias, folder or hub id)."""
    adapter: str | None = None
    """The adapter folder; None for the base alone."""
    system_prompt: str | None = None
    chat_template: str | None = None
    stop_ids: list[int] = field(default_factory=list)
    """Token ids that end a reply: the template's end-of-turn token, then EOS."""


def load_session(adapter: str | None = None, *, base: str | None = None, dtype: str = "auto",
                 registry: str | None = None) -> Session:
    """Return a Session for an adapter folder or registry reference, or the base model alone."""
    from peftkit.methods import load_adapter, read_adapter_meta
    from peftkit.models import load_base, load_tokenizer, set_pad_token
    from peftkit.prompting import read_prompting, stop_ids

    adapter_dir = resolve_adapter(adapter, registry) if adapter else None
    meta = read_adapter_meta(adapter_dir) if adapter_dir else {}
    base = base or meta.get("base_model") or "smollm2-135m-instruct"
    prompting = read_prompting(adapter_dir)
    if adapter_dir and (adapter_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        set_pad_token(tokenizer)
    else:
        tokenizer = load_tokenizer(base)
    model = load_base(base, dtype=dtype)
    if adapter_dir:
        model = load_adapter(model, adapter_dir)
    model.eval()
    return Session(model=model, tokenizer=tokenizer, base_model=base, adapter=str(adapter_dir) if adapter_dir else None,
                   system_prompt=prompting.system_prompt, chat_template=prompting.chat_template,
                   stop_ids=stop_ids(tokenizer, prompting))


def resolve_adapter(adapter: str, registry: str | None) -> Path:
    """Return the adapter folder for a path or a registry reference (name, name@3, name:tag)."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        if (path / "adapter").is_dir() and not (path / "adapter_config.json").is_file():
            return path / "adapter"  # a run directory (its adapter, or a full fine-tune's model)
        return path
    from peftkit.registry import Registry

    return Path(Registry(registry).checkout(adapter))


def generate(session: Session, conversations: list[list[dict]], *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, streamer=None,
             use_adapter: bool = True) -> list[str]:
    """Return the assistant's reply to each conversation (batched, left-padded)."""
    from peftkit.data import build_prompt_ids

    tok = session.tokenizer
    prompts = [build_prompt_ids(tok, msgs, system_prompt=session.system_prompt, chat_template=session.chat_template)
               for msgs in conversations]
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id
    device = next(session.model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    kwargs = dict(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                  eos_token_id=session.stop_ids, pad_token_id=pad, streamer=streamer, **sampling)
    with torch.inference_mode():
        if not use_adapter and hasattr(session.model, "disable_adapter"):
            with session.model.disable_adapter():
                out = session.model.generate(**kwargs)
        else:
            out = session.model.generate(**kwargs)
    replies = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in session.stop_ids), len(row))
        replies.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    return replies


def chat_loop(session: Session, *, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
              input_fn=input, print_fn=print) -> None:
    """Run an interactive chat on the terminal, streaming each reply as it is generated."""
    from transformers import TextStreamer

    history: list[dict] = []
    print_fn("Chat with " + (session.adapter or session.base_model) + ". Empty line or /exit quits, /reset clears.")
    while True:
        try:
            text = input_fn("you> ").strip()
        except EOFError:
            break
        if text in ("", "/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": text})
        print_fn("assistant> ", end="")
        streamer = TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = generate(session, [history], max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, streamer=streamer)[0]
        history.append({"role": "assistant", "content": reply})
