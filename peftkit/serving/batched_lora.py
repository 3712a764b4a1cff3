"""One forward for rows of many LoRA adapters: each LoRA Linear layer gathers its rows' A and B and runs two bmm.

peft's own mixed batch (`adapter_names=`) loops, in every LoRA layer, over the adapters in the batch with one small
matmul pair per sub-batch. Serving instead keeps, per layer, the plain LoRA adapters it holds stacked and zero-padded
to the largest rank (the BGMV idea of Punica and S-LoRA, in plain torch):

    A  (adapters, r_max, in)     B  (adapters, out, r_max), each adapter's scaling folded in
    delta = bmm(bmm(x[rows], A[slot].T), B[slot].T)       then index_add-ed into the base layer's output

Only rows whose adapter the layer holds are computed: base rows (and rows of adapters targeting other modules) cost
nothing there. Padding ranks with zeros changes no sum, so adapters of any rank and scaling (alpha/r, rsLoRA's
alpha/sqrt(r)) share one bmm.

Each `lora.Linear` of the PeftModel gets its `forward` replaced once, by one that runs peft's own forward unless a
batched call is in progress; nothing else of peft's state changes. Layers peft runs another way (embeddings,
quantized layers, modules_to_save) keep peft's per-row path through `adapter_names`, in the same forward. DoRA and
other LoRA variants are not stacked: `covers` says no for their rows and the caller uses peft's path. Inference only:
LoRA dropout is not applied (the server runs in eval mode).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from peftkit.serving.adapters import BASE


@dataclass(frozen=True)
class Stack:
    """The plain LoRA adapters of one Linear layer, stacked."""

    keys: tuple[str, ...]
    slot: dict[str, int]
    """Adapter key -> its index in A and B."""
    A: torch.Tensor
    """(adapters, r_max, in_features); ranks past an adapter's own r are zeros."""
    B: torch.Tensor
    """(adapters, out_features, r_max), multiplied by the adapter's scaling."""


class BatchedLora:
    """The stacked LoRA weights of a PeftModel's Linear layers, and the batched forward that uses them.

    Only the engine's worker thread calls it (loads, unloads and forwards alike), so it holds no lock.
    """

    def __init__(self):
        self.stacks: dict[torch.nn.Module, Stack | None] = {}  # every lora.Linear -> its stack (None: nothing plain)
        self.batchable: set[str] = set()
        """Adapters whose rows the batched forward runs: plain LoRA in every Linear layer holding them."""
        self.needs_names = False  # some other peft layer (embedding, quantized, modules_to_save) must see adapter_names
        self._plan: _Plan | None = None  # set only while a batched forward runs

    def refresh(self, peft_model) -> None:
        """Restack the layers whose adapters changed (after a load or unload); None clears everything."""
        from peft.tuners.lora import Linear, LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        if peft_model is None:
            self.stacks, self.batchable, self.needs_names = {}, set(), False
            return
        stacks, unstackable, needs_names = {}, set(), False
        for module in peft_model.modules():
            if type(module) is Linear:  # exactly: quantized and other subclasses compute their base differently
                keys = tuple(k for k in module.lora_A if plain(module, k))
                old = self.stacks.get(module)
                stacks[module] = old if old is not None and old.keys == keys else build_stack(module, keys)
                unstackable.update(k for k in module.lora_A if k not in keys)
            elif isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
                needs_names = True
        # Change nothing until every stack is built: a failure (out of memory) leaves the last state whole.
        for module in stacks.keys() - self.stacks.keys():
            module.forward = partial(self._forward, module)
        self.stacks, self.needs_names = stacks, needs_names
        self.batchable = {k for k, c in peft_model.peft_config.items() if k not in unstackable
                          and getattr(c, "peft_type", None) == "LORA" and not getattr(c, "use_dora", False)}

    def nbytes(self) -> int:
        """Return the bytes every stack holds (a second copy of the LoRA weights, counted against the memory budget)."""
        return sum(t.numel() * t.element_size() for stack in self.stacks.values() if stack is not None
                   for t in (stack.A, stack.B))

    def covers(self, names: list[str]) -> bool:
        """Return True when every row's adapter is the base or a batchable LoRA adapter."""
        return all(n == BASE or n in self.batchable for n in names)

    def run(self, peft_model, names: list[str], **kwargs) -> Any:
        """Return the PeftModel's output for rows running these adapters (peft's names, "__base__" for the base)."""
        if self.needs_names:  # peft's hooks hand the names to the layers it still runs; ours ignore them
            kwargs["adapter_names"] = names
        self._plan = _Plan(names)
        try:
            return peft_model(**kwargs)
        finally:
            self._plan = None

    def _forward(self, layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = self._plan
        if plan is None:  # any other call (a DoRA lane, peft's own mixed path): peft's forward, untouched
            return type(layer).forward(layer, x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        out = layer.base_layer(x, *args, **kwargs)
        stack = self.stacks.get(layer)
        chosen = plan.select(stack) if stack is not None else None
        if chosen is None:
            return out
        rows, slots = chosen
        xs = x if rows is None else x.index_select(0, rows)
        xs = xs.reshape(xs.shape[0], -1, xs.shape[-1]).to(stack.A.dtype)  # bmm wants (rows, tokens, features)
        hidden = torch.bmm(xs, stack.A.index_select(0, slots).transpose(1, 2))
        delta = torch.bmm(hidden, stack.B.index_select(0, slots).transpose(1, 2)).to(out.dtype)
        if rows is None:
            return out.add_(delta.view(out.shape))
        return out.index_add_(0, rows, delta.view(len(rows), *out.shape[1:]))


class _Plan:
    """The rows of one forward, and per set of adapters a layer holds, which rows it computes with which slots."""

    def __init__(self, names: list[str]):
        self.names = names
        self._chosen: dict[tuple, tuple | None] = {}  # layers holding the same adapters (on one device) share it

    def select(self, stack: Stack) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """Return (rows, slots) of the rows this stack's layer adds a delta to (rows None: all); None when none."""
        key, device = (stack.keys, stack.A.device), stack.A.device
        if key not in self._chosen:
            rows = [i for i, n in enumerate(self.names) if n in stack.slot]
            slots = torch.tensor([stack.slot[self.names[i]] for i in rows], device=device)
            every = len(rows) == len(self.names)
            self._chosen[key] = None if not rows else (None if every else torch.tensor(rows, device=device), slots)
        return self._chosen[key]


def plain(layer, key: str) -> bool:
    """Return True when a layer's adapter is plain LoRA: no DoRA or other variant, no bias on B, not merged."""
    return (key not in layer.lora_variant and not layer.use_dora.get(key, False) and not layer.lora_bias.get(key, False)
            and layer.lora_B[key].bias is None and key not in layer.merged_adapters)


def build_stack(layer, keys: tuple[str, ...]) -> Stack | None:
    """Return the layer's adapters stacked, zero-padded to the largest rank, scaling folded into B; None for no keys."""
    if not keys:
        return None
    weights = [(layer.lora_A[k].weight, layer.lora_B[k].weight, layer.scaling[k]) for k in keys]
    # peft upcasts adapters to fp32. bf16 has fp32's range and its bmm accumulates in fp32, so a bf16 layer's stacks
    # are bf16: half the bytes to hold and gather. fp16 could overflow the rank-r intermediate: it keeps peft's dtype.
    base = getattr(layer.get_base_layer(), "weight", None)
    dtype = base.dtype if base is not None and base.dtype in (torch.bfloat16, torch.float32) else weights[0][0].dtype
    r_max = max(a.shape[0] for a, _, _ in weights)
    first = weights[0][0]
    A = first.new_zeros(len(keys), r_max, first.shape[1], dtype=dtype)
    B = first.new_zeros(len(keys), weights[0][1].shape[0], r_max, dtype=dtype)
    with torch.no_grad():
        for i, (a, b, scaling) in enumerate(weights):
            A[i, :a.shape[0]] = a
            B[i, :, :b.shape[1]] = b.float() * scaling  # scaled in fp32, rounded once to the stack's dtype
    return Stack(keys, {k: i for i, k in enumerate(keys)}, A, B)
