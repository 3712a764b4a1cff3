"""The adapters loaded beside the one base model: what holds each kind, the LRU over them, and which forward runs a lane.

    LoRA, DoRA      adapters of one PeftModel wrapped around the base (`peft`)
    prefix, prompt  their virtual tokens (`virtual`), put in front of a row's prompt at prefill
    IA3, bottleneck a module tree sharing the base's weights, with the adapter injected (`models`)
    full            a whole model of its own (`models`)

The engine decides which rows share a lane; this class answers which model a lane's forward calls.
"""
from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import Any, Callable

from peftkit.methods.catalog import MODEL, VIRTUAL
from peftkit.serving.adapters import Profile
from peftkit.serving.errors import UnsupportedAdapterError
from peftkit.serving.kinds import load_model_adapter, load_virtual, shared_copy

log = logging.getLogger(__name__)
MIXED = "__mixed__"  # the lane base, LoRA, prefix and prompt rows share


class AdapterCache:
    """An LRU of adapters loaded into the model, at most `capacity`; adapters of rows in flight are pinned."""

    def __init__(self, capacity: int, load: Callable[[Profile], None], unload: Callable[[str], None]):
        if capacity < 1:
            raise UnsupportedAdapterError(f"--max-loaded-adapters={capacity} must be at least 1")
        self.capacity = capacity
        self._load = load
        self._unload = unload
        self._pins: OrderedDict[str, int] = OrderedDict()  # key -> rows using it; order = least recently used first
        self.hits = self.misses = self.evictions = 0

    def acquire(self, profile: Profile) -> bool:
        """Return True once the profile's adapter is loaded and pinned; False when every slot is pinned."""
        key = profile.key
        if key in self._pins:
            self.hits += 1
            self._pins[key] += 1
            self._pins.move_to_end(key)
            return True
        if len(self._pins) >= self.capacity and all(n > 0 for n in self._pins.values()):
            return False
        self.misses += 1
        self._load(profile)  # load before evicting, so a failed load leaves the cache as it was
        self._pins[key] = 1
        for old in [k for k, n in self._pins.items() if n == 0 and k != key]:
            if len(self._pins) <= self.capacity:
                break
            self._unload(old)
            del self._pins[old]
            self.evictions += 1
        return True

    def release(self, key: str) -> None:
        """Unpin one use of an adapter (it stays loaded until evicted)."""
        self._pins[key] -= 1

    def loaded(self) -> list[str]:
        """Return the keys loaded now, least recently used first."""
        return list(self._pins)


class LoadedAdapters:
    """Every adapter loaded beside the base model, at most `capacity` at once (least recently used ones go first)."""

    def __init__(self, capacity: int, *, dtype: str, device: str | None):
        self.cache = AdapterCache(capacity, self._load, self._unload)
        self.dtype = dtype
        """Settings dtype, for whole models loaded like a base (full fine-tunes)."""
        self.device = device
        self.model = None
        """The base model; set by attach once the engine's worker has loaded it."""
        self.peft = None
        """The PeftModel around the base holding every loaded LoRA and DoRA adapter (None until the first)."""
        self.virtual: dict[str, Any] = {}  # adapter key -> VirtualTokens of a loaded prefix/prompt adapter
        self.models: dict[str, Any] = {}  # adapter key -> model of a loaded IA3/bottleneck/full adapter
        self.load_seconds = 0.0
        self._pristine = None  # the base's module tree before any LoRA is injected (sharing its weights)

    def attach(self, model) -> None:
        """Serve adapters on this base model, keeping a copy of its module tree (sharing its weights) for IA3 and bottleneck."""
        self.model = model
        self._pristine = shared_copy(model)

    def forward_for(self, lane: str) -> Callable:
        """Return the forward that runs a lane's rows: MIXED, a prefix/prompt adapter's key, or another adapter's key."""
        def forward(ids, mask, positions, cache, names, embeds):
            kwargs = dict(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                          use_cache=True, logits_to_keep=1)
            own = self.models.get(lane)
            if own is not None:  # IA3, bottleneck or full fine-tune: its own module tree
                model = own
            elif self.peft is None or not self.peft.peft_config:
                model = self.model
            elif lane == MIXED or lane in self.virtual:  # base, LoRA and prefix/prompt rows
                model, kwargs["adapter_names"] = self.peft, names
            else:  # an unmixable LoRA adapter (DoRA) runs alone in its lane, as the active adapter
                model = self.peft
                if self.peft.active_adapter != lane:
                    self.peft.set_adapter(lane, inference_mode=True)
            return model(**kwargs).logits[:, -1, :].float()
        return forward

    def _load(self, profile: Profile) -> None:
        started = time.perf_counter()
        if profile.kind == VIRTUAL:
            config = json.loads((profile.folder / "adapter_config.json").read_text(encoding="utf-8"))
            self.virtual[profile.key] = load_virtual(profile.folder, config, dtype=self.model.dtype, device=self.model.device)
        elif profile.kind == MODEL:
            self.models[profile.key] = load_model_adapter(profile.folder, self._pristine, dtype=self.dtype,
                                                          device=self.device)
        else:
            self._load_lora(profile)
        self.load_seconds += time.perf_counter() - started
        log.info("loaded %s adapter %s as %s", profile.method, profile.ref, profile.key)

    def _load_lora(self, profile: Profile) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, profile.folder, adapter_name=profile.key, low_cpu_mem_usage=True)
        else:
            self.peft.load_adapter(profile.folder, adapter_name=profile.key, low_cpu_mem_usage=True)
        # Keep the active adapter one that exists: peft leaves a deleted one active when it was the last.
        self.peft.set_adapter(profile.key, inference_mode=True)
        self.peft.eval()

    def _unload(self, key: str) -> None:
        if self.virtual.pop(key, None) is None and self.models.pop(key, None) is None:
            self.peft.delete_adapter(key)
        log.info("evicted adapter %s", key)
