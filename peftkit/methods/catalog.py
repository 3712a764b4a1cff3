"""Every fact about a fine-tuning method, one record per method; every other method table is derived from here.

No torch: the config, the registry catalog and the CLI's help read it without loading a model.
Adding a method means one record below plus its module (whose `build` and optional `load` the
record names as "module:function", resolved by `peftkit.methods` only when a model is built).
"""
from __future__ import annotations

from dataclasses import dataclass

# How the server runs an adapter of this method (see peftkit.serving.kinds):
LORA = "lora"          # rows of any number of LoRA adapters share one forward (serving/batched_lora.py)
DORA = "dora"          # peft cannot mix DoRA rows: each adapter gets a lane as the shared model's active adapter
VIRTUAL = "virtual"    # prefix/prompt tuning: virtual tokens enter at the row's prefill, sharing the mixed batch
MODEL = "model"        # its own lane on its own module tree (IA3, bottleneck) or a whole model (full)
MIXED_KINDS = (LORA, VIRTUAL)


@dataclass(frozen=True)
class Method:
    """One fine-tuning method as users name it, and what every part of peftkit needs to know about it."""

    name: str
    """The name users type: method.name, --methods, the registry's method column."""
    description: str
    """One line for help texts and docs."""
    builder: str
    """"module:function" in peftkit.methods that wraps a base model for training."""
    peft_types: tuple[str, ...] = ()
    """peft_type values its adapter_config.json holds; empty for a full fine-tune (a plain transformers folder)."""
    loader: str | None = None
    """"module:function" that reads its adapter back where stock PeftModel.from_pretrained cannot; None: stock peft."""
    serve_kind: str = LORA
    """How the server runs it: lora, dora, virtual or model (see the constants above)."""
    keeps_base_forward: bool = True
    """The model's forward is the base's with changed weights, so training may project to the vocabulary only
    at trained positions (the sparse-logit loss); False where virtual tokens or hooks change the sequence or the layers."""
    quantized_base: bool = False
    """The base is loaded in 4-bit NF4 (bitsandbytes) under the adapter."""
    mergeable: bool = False
    """Its update can be folded into the base's weights (merge_and_unload)."""
    vllm: bool = False
    """vLLM can serve it as a LoRA adapter."""
    learning_rate: float | None = None
    """Default learning rate for comparisons; None keeps the config's (the LoRA family, whose presets set it)."""
    lr_bounds: tuple[float, float] = (1e-5, 1e-1)
    """Lowest and highest rate train.learning_rate=auto tries (its range test sweeps between them) and may choose."""

    @property
    def mixes(self) -> bool:
        """Rows of this method can share a forward with other adapters' rows."""
        return self.serve_kind in MIXED_KINDS


# Learning rates: each the better of two in a 10-step probe on SmolLM2-135M (docs/methods.md): prefix 3e-2
# (vs 1e-2), prompt 3e-2 (vs 3e-1), IA3 3e-2 (vs T-Few's 3e-3), bottleneck 1e-2 (vs 1e-3), full 2e-4 (vs 5e-5).
CATALOG: dict[str, Method] = {m.name: m for m in (
    Method("lora", "low-rank update matrices on the chosen linear layers (LoRA; rsLoRA and DoRA as options)",
           "lora:build", ("LORA",), mergeable=True, vllm=True),
    Method("dora", "LoRA with a learned magnitude per output channel (weight-decomposed LoRA)",
           "lora:build_dora", ("LORA",), serve_kind=DORA, mergeable=True),
    Method("qlora", "LoRA on a 4-bit NF4 base (bitsandbytes): the base's memory cut to about a third",
           "lora:build_qlora", ("LORA",), quantized_base=True, mergeable=True, vllm=True),
    Method("prefix", "learned keys and values in front of every layer's attention (prefix tuning)",
           "prompt:build_prefix", ("PREFIX_TUNING",), loader="prompt:load", serve_kind=VIRTUAL,
           keeps_base_forward=False, learning_rate=3e-2, lr_bounds=(1e-4, 3e-1)),
    Method("prompt", "learned input embeddings in front of the prompt (prompt tuning)",
           "prompt:build_prompt", ("PROMPT_TUNING",), loader="prompt:load", serve_kind=VIRTUAL,
           keeps_base_forward=False, learning_rate=3e-2, lr_bounds=(1e-4, 1e-1)),
    Method("ia3", "learned scales on keys, values and the MLP's inner activations (IA3)",
           "ia3:build", ("IA3",), serve_kind=MODEL, mergeable=True, learning_rate=3e-2,
           lr_bounds=(1e-4, 3e-1)),
    Method("bottleneck", "small down-up MLPs after attention and/or the MLP (Houlsby/Pfeiffer adapters)",
           "bottleneck:build", ("PEFTKIT_BOTTLENECK",), loader="bottleneck:load", serve_kind=MODEL,
           keeps_base_forward=False, learning_rate=1e-2),
    Method("full", "every weight trained (the reference the others are measured against)",
           "full:build", (), loader="full:load", serve_kind=MODEL, learning_rate=2e-4,
           lr_bounds=(1e-6, 1e-3)),
)}

METHOD_NAMES: tuple[str, ...] = tuple(CATALOG)
FULL = "full"  # the one method whose output is a whole model, not an adapter


def method_names(**facts: object) -> tuple[str, ...]:
    """Return the names of the methods whose records match every given fact, e.g. method_names(vllm=True)."""
    return tuple(m.name for m in CATALOG.values() if all(getattr(m, k) == v for k, v in facts.items()))


def method_of(adapter_config: dict | None) -> str:
    """Return the method name of an adapter from its adapter_config.json (None: a full fine-tune's folder).

    An unknown peft type gives its own name lower-cased (e.g. "loha"), so it can still be shown and refused.
    """
    if adapter_config is None:
        return FULL
    peft_type = str(adapter_config.get("peft_type") or "")
    if peft_type == "LORA":
        return "dora" if adapter_config.get("use_dora") else "lora"
    for m in CATALOG.values():
        if peft_type in m.peft_types:
            return m.name
    return peft_type.lower() or "unknown"


def serve_kind_of(adapter_config: dict | None) -> str | None:
    """Return how the server runs an adapter (None: a peft type peftkit does not train, such as LoHa)."""
    method = CATALOG.get(method_of(adapter_config))
    return method.serve_kind if method is not None else None
