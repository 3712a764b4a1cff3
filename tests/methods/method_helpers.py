"""Small helpers shared by the method tests (imported as `method_helpers`; pytest puts this folder on sys.path)."""
from __future__ import annotations

from peftkit.config import MethodConfig
from peftkit.methods.catalog import CATALOG, METHOD_NAMES

ALL_METHODS = METHOD_NAMES  # a method added to the catalog joins every contract test
# Small sizes keep the tiny model's tests fast; every other field is the config default.
SMALL = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "num_virtual_tokens": 4, "reduction_factor": 8}


def method_config(name: str, **fields) -> MethodConfig:
    """Return a MethodConfig for name with small sizes (fields override them)."""
    return MethodConfig(name=name, **{**SMALL, **fields})


def load_tiny(tiny_model_dir, method: str):
    """Return the tiny Llama as that method's training loads it (4-bit NF4 for qlora, else fp32)."""
    from peftkit.models import load_base

    return load_base(str(tiny_model_dir), dtype="fp32", quantize_4bit=CATALOG[method].quantized_base)
