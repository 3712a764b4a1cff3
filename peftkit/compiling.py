"""`train.compile`: torch.compile each decoder layer in place, with its compiled code cached on disk.

Regional compilation: every decoder layer of a Llama runs the same code, so compiling the layer
(not the whole model) compiles one graph and reuses it for all of them, and the vocabulary loss,
the data collator and the optimizer stay eager. Packed attention (`peftkit.packed_attention`) is
excluded from the graphs: its per-example split depends on the batch's data and runs eagerly
between them. Inductor keeps what it compiles under $PEFTKIT_HOME/compile-cache (unless
TORCHINDUCTOR_CACHE_DIR is set), so the second run with the same model and settings skips most of
the compile time. Nothing about saving changes: `Module.compile` leaves parameter names as they are.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Return the folder inductor caches compiled code in (set up here unless the user chose one)."""
    from peftkit.config import peftkit_home

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Inductor writes its own default into the variable once it has run: that one is not the user's choice.
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    folder = peftkit_home() / "compile-cache"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def decoder_layers(model) -> list[torch.nn.Module]:
    """Return the decoder layers of a (possibly peft-wrapped) causal LM."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"train.compile: {type(lm).__name__} has no model.layers to compile; set train.compile: false")
    return list(layers)


def compile_layers(model) -> int:
    """Compile every decoder layer of model in place; return how many were compiled."""
    folder = cache_dir()
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=None)  # static first; a second sequence length recompiles once with dynamic shapes
    log.info("train.compile: %d decoder layers compiled on first use (cache %s)", len(layers), folder)
    return len(layers)


def compile_seconds() -> float:
    """Return the seconds torch.compile has spent compiling in this process (forward and backward graphs)."""
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))
