"""How each fine-tuning method is run by the server, beside the LoRA adapters of the shared PeftModel.

Each method's kind is its `serve_kind` in peftkit.methods.catalog (`serve_kind_of` reads it from an
adapter_config.json):

    lora     rows of any number of LoRA adapters share one forward (gathered per layer: peftkit.serving.batched_lora)
    dora     peft cannot mix DoRA rows, so each DoRA adapter gets a lane, as the shared model's active adapter
    virtual  prefix and prompt tuning change no weight: their virtual tokens go into a row's prefill (as a
             pre-filled key/value cache or as leading input embeddings), so these rows share forwards with
             base and LoRA rows too
    model    IA3, bottleneck adapters and full fine-tunes change what the layers compute, so each runs in its
             own lane on its own module tree: IA3 and bottleneck on a copy of the base's modules that shares
             every weight tensor (only the small adapter is new memory); a full fine-tune is a whole model

Virtual tokens are placed exactly as training placed them: n virtual tokens at positions 0..n-1,
seen by every prompt token, whose positions then start at n. Their layouts (the prefix table, the
prefill's mask and positions) are defined once, in peftkit.methods.prompt.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by whoever loads a model; this module stays light to import
    import torch


@dataclass(frozen=True)
class VirtualTokens:
    """A prefix- or prompt-tuning adapter's learned virtual tokens, ready to put in front of a prompt."""

    kind: str
    """"prefix" (keys and values for every layer) or "prompt" (input embeddings)."""
    length: int
    embeddings: torch.Tensor | None = None
    """prompt: (length, hidden) input embeddings."""
    keys: tuple[torch.Tensor, ...] = ()
    """prefix: one (kv heads, length, head dim) tensor per layer."""
    values: tuple[torch.Tensor, ...] = ()


def load_virtual(folder: Path, config: dict, *, dtype: torch.dtype, device: torch.device) -> VirtualTokens:
    """Return the virtual tokens saved in a prefix/prompt adapter folder (the values peft itself uses when loaded)."""
    from safetensors import safe_open

    weights = Path(folder) / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        if "prompt_embeddings" not in f.keys():
            raise ValueError(f"{weights} holds no prompt_embeddings tensor; save the adapter again with peftkit train")
        table = f.get_tensor("prompt_embeddings")
    n = int(config["num_virtual_tokens"])
    table = table[:n].to(device=device, dtype=dtype)
    if config["peft_type"] == "PROMPT_TUNING":
        return VirtualTokens("prompt", n, embeddings=table)
    from peftkit.methods.prompt import split_prefix_table

    keys, values = split_prefix_table(table, config)
    return VirtualTokens("prefix", n, keys=keys, values=values)


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Return a copy of the module tree whose parameters and buffers are the very same tensors.

    peft and our bottleneck hooks change the module tree they are given (wrapping layers, adding
    hooks); on a shared copy they leave the served base untouched while holding no second copy of its weights.
    """
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def load_model_adapter(folder: Path, pristine: torch.nn.Module, *, dtype: str, device: str | None) -> torch.nn.Module:
    """Return the model that runs one IA3, bottleneck or full fine-tune adapter, in eval mode."""
    from peftkit.methods import load_adapter
    from peftkit.methods.full import is_full_finetune
    from peftkit.models import load_base

    if is_full_finetune(folder):  # a whole model: its own weights, loaded like a base
        return load_base(str(folder), dtype=dtype, device=device).eval()
    return load_adapter(shared_copy(pristine), folder).eval()
