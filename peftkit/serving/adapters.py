"""Which model a request names, and the LRU of adapters loaded beside the one base model.

Clients name models by registry reference (`name`, `name@3`, `name:stable`) or by the base model's
served name. A name is looked up in the registry catalog and nowhere else: it is never read as a
path. What the engine needs to run an adapter (its folder, method, chat template, system prompt
and stop tokens, as recorded at training time) is read once per content digest and kept.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from peftkit.errors import PeftkitError
from peftkit.serving.errors import UnknownModelError, UnsupportedAdapterError
from peftkit.serving.kinds import LORA, VIRTUAL

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
MAX_MODEL_NAME = 256
SERVED_METHODS = ("lora", "qlora", "dora", "prefix", "prompt", "ia3", "bottleneck", "full")
PROFILE_CACHE = 1024


@dataclass(frozen=True)
class Profile:
    """How to run one model name: the peft adapter to use (None: the base) and the training-time prompt settings."""

    name: str
    """The adapter's registry name, or the base's served name (metrics label this)."""
    ref: str | None
    """The immutable registry reference name@version; None for the base model."""
    key: str | None
    """peft adapter name inside the shared PeftModel, derived from the files' digest; None for the base."""
    folder: Path | None
    method: str
    kind: str
    """How the engine runs it: lora, dora, virtual or model (see peftkit.serving.kinds); "base" for the base."""
    mixable: bool
    """Rows may share a forward with other adapters' rows: LoRA without DoRA (adapter_names), prefix and prompt tuning."""
    system_prompt: str | None
    chat_template: str | None
    stop_ids: frozenset[int]


class Resolver:
    """Turns the model names clients send into Profiles, through the registry only."""

    def __init__(self, registry_path: str | Path | None, base_name: str, base_fingerprint: str | None,
                 tokenizer: Any, tokenizer_lock: threading.Lock):
        self.registry_path = registry_path
        self.base_name = base_name
        self.base_fingerprint = base_fingerprint
        self.tokenizer = tokenizer
        self.tokenizer_lock = tokenizer_lock
        self._local = threading.local()  # sqlite connections may not cross threads
        self._profiles: OrderedDict[str, Profile] = OrderedDict()
        self._lock = threading.Lock()
        self.base = Profile(base_name, None, None, None, "base", "base", True, None, None, self._stops(None))

    def registry(self):
        """Return this thread's Registry handle."""
        reg = getattr(self._local, "registry", None)
        if reg is None:
            from peftkit.registry import Registry

            reg = self._local.registry = Registry(self.registry_path)
        return reg

    def resolve(self, model: str) -> Profile:
        """Return the Profile for a model name; UnknownModelError when neither the base nor a registry entry."""
        if model == self.base_name:
            return self.base
        if not isinstance(model, str) or not model or len(model) > MAX_MODEL_NAME:
            raise UnknownModelError("The model name must be a registry reference such as my-adapter, my-adapter@3 "
                                    "or my-adapter:stable, or the base model's name", param="model")
        from peftkit.registry import InvalidNameError, UnknownRefError

        try:
            entry = self.registry().resolve(model)
        except (UnknownRefError, InvalidNameError):
            raise UnknownModelError(f"The model `{model}` does not exist; GET /v1/models lists the base model and "
                                    "the registry's adapters", param="model") from None
        with self._lock:
            cached = self._profiles.get(entry.content_sha256)
            if cached is not None:
                self._profiles.move_to_end(entry.content_sha256)
        if cached is None:
            cached = self._build(entry)
            with self._lock:
                self._profiles[entry.content_sha256] = cached
                while len(self._profiles) > PROFILE_CACHE:
                    self._profiles.popitem(last=False)
        # The same files may be registered under several names: label by the name asked for.
        return replace(cached, name=entry.name, ref=entry.ref)

    def servable(self, entry) -> str | None:
        """Return why this server cannot run a registry entry, or None when it can."""
        if (entry.method or "").lower() not in SERVED_METHODS:
            return f"method {entry.method!r} is not one this server runs ({', '.join(SERVED_METHODS)})"
        if entry.base_fingerprint and self.base_fingerprint and entry.base_fingerprint != self.base_fingerprint:
            return (f"it was trained on base {entry.base_model or entry.base_fingerprint[:19]} and this server runs "
                    f"{self.base_name}; start a server with --base set to that model")
        return None

    def _build(self, entry) -> Profile:
        why = self.servable(entry)
        if why:
            raise UnsupportedAdapterError(f"adapter {entry.ref} cannot be served: {why}", param="model")
        from peftkit.methods.full import is_full_finetune
        from peftkit.serving.kinds import adapter_kind

        folder = Path(self.registry().checkout(entry.ref))
        config = None
        if not is_full_finetune(folder):
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        kind = adapter_kind(config)
        if kind is None:
            raise UnsupportedAdapterError(f"adapter {entry.ref} cannot be served: its peft_type {config.get('peft_type')!r} "
                                          "is not one this server runs (LoRA, DoRA, prefix, prompt, IA3, bottleneck, "
                                          "or a full fine-tune)", param="model")
        data = ((entry.config or {}).get("data") or {}) if isinstance(entry.config, dict) else {}
        template = data.get("chat_template") or _saved_template(folder)
        try:
            stops = self._stops(template)
        except PeftkitError as exc:
            raise UnsupportedAdapterError(f"adapter {entry.ref} cannot be served: its chat template fails here ({exc})",
                                          param="model") from None
        return Profile(entry.name, entry.ref, "ad_" + entry.content_sha256[:16], folder, entry.method, kind,
                       kind in (LORA, VIRTUAL), data.get("system_prompt"), template, stops)

    def _stops(self, chat_template: str | None) -> frozenset[int]:
        from peftkit.serving.prompts import stop_token_ids

        with self.tokenizer_lock:
            return frozenset(stop_token_ids(self.tokenizer, chat_template=chat_template))


def _saved_template(folder: Path) -> str | None:
    # Training saves the tokenizer beside the adapter; its template is the one the adapter learned.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


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
