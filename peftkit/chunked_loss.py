"""Cross-entropy over the vocabulary in row chunks, with its gradient computed in the forward pass.

The stock loss materializes every trained position's logits (rows x 49,152 for SmolLM2, 128,256
for Llama 3.1), casts them to fp32, and keeps them and the log-softmax for the backward pass:
hundreds of MB allocated, touched and freed on every step, which on a CPU costs more than the
vocabulary matmul itself. Here each chunk of rows is projected, its loss and its gradient with
respect to the hidden states (and the head's weight, if trainable) are computed at once, and
the chunk's logits are dropped before the next; the backward pass only scales what was kept.
On a CPU the chunk's fp32 logits (24 MiB) live in buffers kept between steps, so no step pays
for faulting hundreds of MB of fresh pages in.
"""
from __future__ import annotations

import torch

CHUNK_BYTES = 24 * 2**20
"""fp32 logits per chunk on a CPU; a GPU takes GPU_CHUNK_BYTES (fewer, larger matmuls, no page faults to avoid)."""
GPU_CHUNK_BYTES = 1024 * 2**20


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, targets), as an autograd Function."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        budget = GPU_CHUNK_BYTES if weight.device.type == "cuda" else CHUNK_BYTES
        rows = max(1, budget // (4 * weight.shape[0]))
        low, high = _buffers(rows, weight)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            n = h.shape[0]
            logits = high[:n].copy_(torch.nn.functional.linear(h, weight))  # into reused memory: no page faults
            picked = logits.gather(1, t[:, None])
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # one pass of exp, in place: unnormalized softmax
            total = probs.sum(dim=-1, keepdim=True)
            loss += (top + total.log() - picked).sum()  # log-sum-exp minus the target's logit
            if grad_hidden is None and grad_weight is None:
                continue
            probs.div_(total)
            probs[torch.arange(n, device=t.device), t] -= 1  # d loss / d logits
            g = low[:n].copy_(probs)
            if grad_hidden is not None:
                grad_hidden[start:start + n] = g @ weight
            if grad_weight is not None:
                grad_weight += (g.t() @ h).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.to(torch.float32)
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
                None)


_BUFFERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _buffers(rows: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logits in the weight's dtype, logits in fp32) scratch buffers, kept between steps."""
    key = (rows, weight.shape[0], weight.dtype, weight.device)
    if key not in _BUFFERS:
        _BUFFERS.clear()  # one shape at a time: a new model or vocabulary frees the old buffers
        _BUFFERS[key] = (torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=weight.device),
                         torch.empty(rows, weight.shape[0], dtype=torch.float32, device=weight.device))
    return _BUFFERS[key]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return the summed cross-entropy of the rows' logits (hidden @ weight.T) against targets, chunk by chunk."""
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets)
