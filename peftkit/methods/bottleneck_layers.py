"""The bottleneck adapter layer (Houlsby et al. 2019, Pfeiffer et al. 2021) and where it hooks into a Llama layer.

An adapter is down-projection -> nonlinearity -> up-projection, added back to its input.
It sits on the output of a decoder layer's attention block and/or its MLP block, before
the layer's own residual addition, which is where Houlsby (both) and Pfeiffer (MLP only)
put it. It is attached with forward hooks, so the base model's modules and state-dict
keys stay untouched and removing the hooks gives back the base model exactly.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from peftkit.methods.errors import MethodError

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}
PLACEMENTS = {"attention": ("attention",), "mlp": ("mlp",), "both": ("attention", "mlp")}
SUBLAYERS = {"attention": "self_attn", "mlp": "mlp"}  # our name -> the attribute on a Llama decoder layer


class BottleneckAdapter(nn.Module):
    """Down-projection, nonlinearity, up-projection, plus the input (the residual)."""

    def __init__(self, hidden_size: int, width: int, activation: str = "relu", *, device=None, dtype=torch.float32):
        super().__init__()
        self.down = nn.Linear(hidden_size, width, device=device, dtype=dtype)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, hidden_size, device=device, dtype=dtype)
        # A zero up-projection makes a fresh adapter the identity, so training starts from the base model.
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return hidden plus the adapter's update (computed in the adapter's dtype, returned in hidden's)."""
        update = self.up(self.act(self.down(hidden.to(self.down.weight.dtype))))
        return hidden + update.to(hidden.dtype)


def decoder_layers(model) -> nn.ModuleList:
    """Return the decoder layers of a Llama-style causal LM (model.model.layers)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, name) for layer in layers for name in SUBLAYERS.values()):
        raise MethodError(f"method.name='bottleneck' needs a Llama-style model (model.layers[i].self_attn and .mlp); "
                          f"{type(model).__name__} has no such layers. Use lora, which works on any linear layer")
    return layers


def build_adapters(hidden_size: int, num_layers: int, width: int, placement: str, activation: str, *,
                   device=None, dtype=torch.float32) -> nn.ModuleList:
    """Return one {placement: adapter} dict per decoder layer."""
    if placement not in PLACEMENTS:
        raise MethodError(f"method.adapter_placement={placement!r} is unknown; choose one of {', '.join(PLACEMENTS)}")
    if activation not in ACTIVATIONS:
        raise MethodError(f"bottleneck activation {activation!r} is unknown; choose one of {', '.join(ACTIVATIONS)}")
    return nn.ModuleList(
        nn.ModuleDict({place: BottleneckAdapter(hidden_size, width, activation, device=device, dtype=dtype)
                       for place in PLACEMENTS[placement]})
        for _ in range(num_layers))


def attach(model, adapters: nn.ModuleList, is_enabled: Callable[[], bool]) -> list:
    """Hook each adapter onto its sublayer's output; return the hook handles (remove them to detach)."""
    handles = []
    for layer, per_layer in zip(decoder_layers(model), adapters):
        for place, adapter in per_layer.items():
            handles.append(getattr(layer, SUBLAYERS[place]).register_forward_hook(_hook(adapter, is_enabled)))
    return handles


def _hook(adapter: BottleneckAdapter, is_enabled: Callable[[], bool]):
    def hook(module, args, output):
        if not is_enabled():
            return None  # None keeps the sublayer's own output
        if isinstance(output, tuple):  # attention returns (hidden, attention weights)
            return (adapter(output[0]), *output[1:])
        return adapter(output)
    return hook
