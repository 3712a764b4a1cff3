"""LoRA's forward in the base's dtype, with fp32 adapter weights: what autocast does, without its casts of activations.

peft keeps LoRA weights in fp32 on a bf16 base (so AdamW updates are not lost to bf16 rounding) and
therefore casts each LoRA layer's input to fp32, runs dropout, both projections, the scaling and
the addition in fp32, and casts the sum back: six passes over a (tokens x hidden) tensor per
adapted layer. On SmolLM2 in bf16 those casts were 18% of a LoRA step and the fp32 multiplies
another 10% (torch profiler, docs/benchmarks.md). Here the small weights are cast instead (rank x
hidden, with the scaling folded into B and the dropout's into A), the activations stay in the base's dtype, and the weights
keep their fp32 master copy and fp32 gradients. Layers whose input already has the adapter's dtype
(an fp32 model), or that hold anything but one plain LoRA (DoRA, a LoRA bias, several active
adapters, merged or disabled), run peft's own forward unchanged.
"""
from __future__ import annotations

import types

import torch

from peftkit.methods.dropout import ByteMaskDropout


def mixed_precision_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Return the base layer's output plus the LoRA update computed in x's dtype (peft's forward where that differs)."""
    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    lora_a = self.lora_A[name] if name in self.lora_A else None
    if (args or kwargs or lora_a is None or self.disable_adapters or self.merged or name in self.lora_variant
            or x.dtype == lora_a.weight.dtype or self.lora_B[name].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    dropout, low = self.lora_dropout[name], self.lora_A[name].weight
    if isinstance(dropout, ByteMaskDropout) and dropout.training and dropout.cut:
        dropped, low = dropout.unscaled(x), low * dropout.scale  # the dropout's scale rides on A: one pass less over x
    else:
        dropped = dropout(x)
    high = self.lora_B[name].weight * self.scaling[name]
    update = torch.nn.functional.linear(torch.nn.functional.linear(dropped, low.to(x.dtype)), high.to(x.dtype))
    return self.base_layer(x) + update


def use_mixed_precision_forward(model) -> int:
    """Give every peft LoRA Linear in model the mixed-precision forward; return how many layers got it."""
    from peft.tuners.lora import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear:  # subclasses (quantized bases) keep their own forward
            module.forward = types.MethodType(mixed_precision_forward, module)
            count += 1
    return count
