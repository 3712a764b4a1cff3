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
from functools import partial
from typing import Any, Callable

from peftkit.methods.catalog import MODEL, VIRTUAL
from peftkit.serving.adapters import Profile
from peftkit.serving.batched_lora import BatchedLora
from peftkit.serving.errors import AdapterMismatchError, AdapterUnavailableError, ServingError, UnsupportedAdapterError
from peftkit.serving.kinds import load_model_adapter, load_virtual, shared_copy
from peftkit.serving.memory import MIB, own_bytes

log = logging.getLogger(__name__)
MIXED = "__mixed__"  # the lane base, LoRA, prefix and prompt rows share


class AdapterCache:
    """An LRU of adapters loaded into the model, at most `capacity`; adapters of rows in flight are pinned.

    It also knows what each loaded adapter weighs, so the engine can count adapters against its memory budget and
    evict unpinned ones to make room.
    """

    def __init__(self, capacity: int, load: Callable[[Profile], int], unload: Callable[[str], None]):
        if capacity < 1:
            raise UnsupportedAdapterError(f"--max-loaded-adapters={capacity} must be at least 1")
        self.capacity = capacity
        self._load = load  # loads an adapter and returns the bytes its weights take
        self._unload = unload
        self._pins: OrderedDict[str, int] = OrderedDict()  # key -> rows using it; order = least recently used first
        self.sizes: dict[str, int] = {}  # key -> bytes of its weights
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
        self.sizes[key] = self._load(profile)  # load before evicting, so a failed load leaves the cache as it was
        self._pins[key] = 1
        for old in [k for k, n in self._pins.items() if n == 0 and k != key]:
            if len(self._pins) <= self.capacity:
                break
            self._evict(old)
        return True

    def release(self, key: str) -> None:
        """Unpin one use of an adapter (it stays loaded until evicted)."""
        self._pins[key] -= 1

    def loaded(self) -> list[str]:
        """Return the keys loaded now, least recently used first."""
        return list(self._pins)

    def loaded_bytes(self) -> int:
        """Return the bytes of every loaded adapter's weights."""
        return sum(self.sizes.get(k, 0) for k in list(self._pins))

    def pinned_bytes(self, adding: Profile | None = None) -> int:
        """Return the bytes of the adapters rows pin, counting `adding` as pinned too."""
        pins = dict(self._pins)
        total = sum(self.sizes.get(k, 0) for k, n in pins.items() if n > 0)
        if adding is not None and adding.key is not None and not pins.get(adding.key):
            total += self.sizes.get(adding.key, adding.weight_bytes)
        return total

    def make_room(self, limit: int, adding: Profile | None = None) -> None:
        """Evict unpinned adapters, least recently used first, until the loaded ones (and `adding`) fit in limit bytes."""
        extra = adding.weight_bytes if adding is not None and adding.key is not None and adding.key not in self._pins else 0
        for old in [k for k, n in self._pins.items() if n == 0 and (adding is None or k != adding.key)]:
            if self.loaded_bytes() + extra <= limit:
                break
            self._evict(old)

    def _evict(self, key: str) -> None:
        self._unload(key)
        del self._pins[key]
        self.sizes.pop(key, None)
        self.evictions += 1


class LoadedAdapters:
    """Every adapter loaded beside the base model, at most `capacity` at once (least recently used ones go first)."""

    def __init__(self, capacity: int, *, dtype: str, device: str | None):
        self.cache = AdapterCache(capacity, self._load, self._unload)
        self._base_tensors: set[int] = set()  # data pointers of the base's weights, which shared copies do not own
        self.dtype = dtype
        """Settings dtype, for whole models loaded like a base (full fine-tunes)."""
        self.device = device
        self.model = None
        """The base model; set by attach once the engine's worker has loaded it."""
        self.peft = None
        """The PeftModel around the base holding every loaded LoRA and DoRA adapter (None until the first)."""
        self.batched = BatchedLora()  # the LoRA adapters of `peft` stacked per layer, for mixed batches
        self.virtual: dict[str, Any] = {}  # adapter key -> VirtualTokens of a loaded prefix/prompt adapter
        self.models: dict[str, Any] = {}  # adapter key -> model of a loaded IA3/bottleneck/full adapter
        self.load_seconds = 0.0
        self._pristine = None  # the base's module tree before any LoRA is injected (sharing its weights)

    def attach(self, model) -> None:
        """Serve adapters on this base model, keeping a copy of its module tree (sharing its weights) for IA3 and bottleneck."""
        self.model = model
        self._pristine = shared_copy(model)
        self._base_tensors = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}

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
            elif (lane == MIXED or lane in self.virtual) and self.batched.covers(names):
                model = partial(self.batched.run, self.peft, names)  # base, LoRA and prefix/prompt rows: gathered bmm
            elif lane == MIXED or lane in self.virtual:  # a row's adapter is not plain LoRA: peft's per-adapter loop
                model, kwargs["adapter_names"] = self.peft, names
            else:  # an unmixable LoRA adapter (DoRA) runs alone in its lane, as the active adapter
                model = self.peft
                if self.peft.active_adapter != lane:
                    self.peft.set_adapter(lane, inference_mode=True)
            return model(**kwargs).logits[:, -1, :].float()
        return forward

    def _load(self, profile: Profile) -> int:
        """Load an adapter and return the bytes its own weights take; a misfit raises AdapterMismatchError."""
        started = time.perf_counter()
        try:
            size = self._load_kind(profile)
        except (ServingError, MemoryError, FileNotFoundError):
            raise
        except OSError as exc:
            raise AdapterUnavailableError(f"adapter {profile.ref}: its files cannot be read ({exc})", param="model") from None
        except Exception as exc:  # noqa: BLE001 - loading depends on the files alone: they do not fit this base
            if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
                raise
            raise AdapterMismatchError(f"adapter {profile.ref} cannot be served: its files do not load on this base "
                                          f"({type(exc).__name__}: {str(exc)[:500]})", param="model") from None
        self.load_seconds += time.perf_counter() - started
        log.info("loaded %s adapter %s as %s (%.1f MiB)", profile.method, profile.ref, profile.key, size / MIB)
        return size

    def _load_kind(self, profile: Profile) -> int:
        if profile.kind == VIRTUAL:
            config = json.loads((profile.folder / "adapter_config.json").read_text(encoding="utf-8"))
            tokens = load_virtual(profile.folder, config, dtype=self.model.dtype, device=self.model.device)
            check_virtual(tokens, self.model.config, profile.ref)
            self.virtual[profile.key] = tokens
            return own_bytes([tokens.embeddings] if tokens.embeddings is not None else [*tokens.keys, *tokens.values],
                             set())
        if profile.kind == MODEL:
            model = load_model_adapter(profile.folder, self._pristine, dtype=self.dtype, device=self.device)
            check_model(model, self.model.config, profile)
            self.models[profile.key] = model
            return own_bytes([*model.parameters(), *model.buffers()], self._base_tensors)
        return self._load_lora(profile)

    def _load_lora(self, profile: Profile) -> int:
        from peft import PeftModel

        first = self.peft is None
        stacked = self.batched.nbytes()
        try:
            if first:  # on a copy sharing the base's weights: a failed load leaves the served base untouched
                self.peft = PeftModel.from_pretrained(shared_copy(self._pristine), profile.folder, adapter_name=profile.key,
                                                      low_cpu_mem_usage=True)
            else:
                self.peft.load_adapter(profile.folder, adapter_name=profile.key, low_cpu_mem_usage=True)
            check_peft_keys(self.peft, profile.key, profile)
            self.batched.refresh(self.peft)
        except BaseException:
            self._drop_lora(profile.key, first)
            raise
        # Keep the active adapter one that exists: peft leaves a deleted one active when it was the last.
        self.peft.set_adapter(profile.key, inference_mode=True)
        self.peft.eval()
        params = [p for n, p in self.peft.named_parameters() if f".{profile.key}." in n or n.endswith(f".{profile.key}")]
        # Its rows of the batched-forward stacks count too (more when its rank widened every adapter's padding).
        return own_bytes(params, set()) + max(0, self.batched.nbytes() - stacked)

    def _drop_lora(self, key: str, first: bool) -> None:
        """Undo a failed LoRA load: the adapter layers peft added for it go, so they never run half loaded."""
        if first or self.peft is None:
            self.peft = None
        elif key in self.peft.peft_config:
            self.peft.delete_adapter(key)
        if self.peft is not None and self.peft.peft_config:
            self.peft.set_adapter(next(iter(self.peft.peft_config)), inference_mode=True)
        self.batched.refresh(self.peft)

    def _unload(self, key: str) -> None:
        if self.virtual.pop(key, None) is None and self.models.pop(key, None) is None:
            self.peft.delete_adapter(key)
            self.batched.refresh(self.peft)
        log.info("evicted adapter %s", key)


def check_peft_keys(model, adapter_name: str, profile: Profile) -> None:
    """Raise AdapterMismatchError when the tensors saved for a peft adapter are not the ones its config makes.

    peft builds the layers from adapter_config.json, then loads what it finds: tensors of modules the config does not
    target are dropped, and targeted layers without tensors would run uninitialized. Registries of older peftkit
    versions did not check this at `registry add`.
    """
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(profile.folder / "adapter_model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    made = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    if saved != made:
        missing, extra = sorted(made - saved), sorted(saved - made)
        raise AdapterMismatchError(
            f"adapter {profile.ref} cannot be served: its adapter_config.json does not match its tensors (rank, "
            f"target modules or peft_type): {len(missing)} tensors the config needs are missing (e.g. {missing[:2]}), "
            f"{len(extra)} tensors are not in the config (e.g. {extra[:2]}); re-save and re-register it", param="model")


def check_virtual(tokens, base_config, ref: str | None) -> None:
    """Raise AdapterMismatchError when prefix/prompt virtual tokens do not fit the served base's shapes."""
    heads = base_config.num_attention_heads
    kv_heads = getattr(base_config, "num_key_value_heads", None) or heads
    head_dim = getattr(base_config, "head_dim", None) or base_config.hidden_size // heads
    if tokens.kind == "prompt":
        found, wanted = tuple(tokens.embeddings.shape[1:]), (base_config.hidden_size,)
    else:
        found = (len(tokens.keys), *tokens.keys[0].shape[::2]) if tokens.keys else (0,)
        wanted = (base_config.num_hidden_layers, kv_heads, head_dim)
    if found != wanted:
        what = "hidden size" if tokens.kind == "prompt" else "layers, kv heads, head dim"
        raise AdapterMismatchError(f"adapter {ref} cannot be served: its {tokens.kind} virtual tokens have {what} "
                                      f"{found}, and this base needs {wanted}; it was trained for another base",
                                      param="model")


def check_model(model, base_config, profile: Profile) -> None:
    """Raise AdapterMismatchError when an IA3 adapter's tensors miss its config, or a full fine-tune's vocabulary
    is not the base's (the server tokenizes with the base's tokenizer). Bottleneck's own loader checks its tensors."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        check_peft_keys(model, next(iter(model.peft_config)), profile)
    elif not (profile.folder / "adapter_config.json").is_file():  # a full fine-tune
        vocab = getattr(model.config, "vocab_size", None)
        if vocab != base_config.vocab_size:
            raise AdapterMismatchError(f"adapter {profile.ref} cannot be served: its vocabulary has {vocab} tokens "
                                          f"and the base's tokenizer {base_config.vocab_size}", param="model")
