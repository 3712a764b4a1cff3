"""The memory budget: what KV caches and loaded adapters may use, and what each row and each adapter costs.

Once the base model is loaded, a share of the memory left (GPU memory on a GPU, else RAM; `kv_cache_fraction`),
or a fixed `kv_cache_mib`, is the budget. A row's KV cache grows to `reserve` positions (its virtual tokens,
prompt and max_tokens), each costing layers x kv heads x head dim x 2 (keys and values) x the dtype's bytes.
Rows of one lane are left-padded to its widest row, so a lane holds rows x its widest reserve positions.
Loaded adapters count by their own weights' bytes: a LoRA its matrices, a full fine-tune a whole model.
The engine admits a row only while every lane at its largest plus the adapters pinned by rows fit.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)
MIB = 1 << 20


@dataclass(frozen=True)
class Budget:
    """Bytes that KV caches and loaded adapters may use, and the KV bytes of one cache position of one row."""

    total: int
    per_token: int

    def kv_bytes(self, lanes: Iterable[list[int]]) -> int:
        """Return the KV bytes lanes can reach: per lane, its rows times its widest reserve."""
        return self.per_token * sum(len(reserves) * max(reserves) for reserves in lanes if reserves)

    def tokens_left(self, adapter_bytes: int) -> int:
        """Return the cache positions one row alone may reserve beside adapters of these bytes."""
        return max(0, (self.total - adapter_bytes) // self.per_token)


def kv_bytes_per_token(config: Any, element_size: int) -> int:
    """Return the KV-cache bytes of one position: layers x kv heads x head dim x 2 (keys, values) x element size."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers) * kv_heads * head_dim * 2 * element_size


def budget_bytes(fraction: float, mib: float | None, device: Any) -> int:
    """Return the budget: mib when given, else fraction of the memory free on the device now."""
    if mib is not None:
        return int(mib * MIB)
    return int(available_bytes(device) * fraction)


def available_bytes(device: Any) -> int:
    """Return the memory free now: the GPU's for a CUDA device, else the RAM the kernel says is available."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        log.warning("cannot tell the free memory here; set --kv-cache-mib")
        return 8 << 30


def weights_bytes(folder: Path, element_size: int) -> int:
    """Return the bytes a folder's safetensors tensors take at element_size each (from the headers; no tensor data read)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    numel = 1
                    for n in f.get_slice(name).get_shape():
                        numel *= n
                    total += numel * element_size
        except Exception:  # noqa: BLE001 - a damaged file is reported when it is loaded; its size is estimate enough
            total += path.stat().st_size
    return total


def own_bytes(tensors: Iterable[Any], shared: set[int]) -> int:
    """Return the bytes of the distinct tensors whose storage is not in shared (data pointers of the base's tensors)."""
    seen, total = set(shared), 0
    for t in tensors:
        ptr = t.data_ptr()
        if ptr not in seen and t.device.type != "meta":
            seen.add(ptr)
            total += t.numel() * t.element_size()
    return total
