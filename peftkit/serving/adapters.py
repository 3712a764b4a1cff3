"""Which model a request names: registry references and the base's served name, turned into Profiles.

Clients name models by registry reference (`name`, `name@3`, `name:stable`) or by the base model's
served name. A name is looked up in the registry catalog and nowhere else: it is never read as a
path. What the engine needs to run an adapter (its folder, how its method is served, and the chat
template, system prompt and stop tokens it was trained with, from peftkit.prompting) is read once
per content digest and kept. Which methods are served, and how, is the method catalog's
(peftkit.methods.catalog); the adapters loaded now are peftkit.serving.loaded's.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.methods.catalog import CATALOG, MIXED_KINDS, serve_kind_of
from peftkit.prompting import Prompting, read_prompting, stop_ids
from peftkit.serving.errors import UnknownModelError, UnsupportedAdapterError

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
MAX_MODEL_NAME = 256
SERVED_METHODS = tuple(CATALOG)  # every method in the catalog has a serve kind: the server runs all peftkit trains
SERVED_PEFT_TYPES = tuple(dict.fromkeys(t for m in CATALOG.values() for t in m.peft_types))
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
    """How the engine runs it: the method's serve_kind (lora, dora, virtual or model; see peftkit.serving.kinds),
    or "base" for the base."""
    mixable: bool
    """Rows may share a forward with other adapters' rows: a kind of the catalog's MIXED_KINDS (LoRA, prefix, prompt)."""
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
        base = read_prompting(None)
        self.base = Profile(base_name, None, None, None, "base", "base", True, None, None, self._stops(base))

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
            entry = self.registry().show(model)
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

        folder = Path(self.registry().checkout(entry.ref))
        config = None
        if not is_full_finetune(folder):
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        kind = serve_kind_of(config)
        if kind is None:
            raise UnsupportedAdapterError(f"adapter {entry.ref} cannot be served: its peft_type {config.get('peft_type')!r} "
                                          f"is not one this server runs ({', '.join(SERVED_PEFT_TYPES)}, or a full "
                                          "fine-tune)", param="model")
        prompting = read_prompting(folder, entry.config if isinstance(entry.config, dict) else None)
        try:
            stops = self._stops(prompting)
        except PeftkitError as exc:
            raise UnsupportedAdapterError(f"adapter {entry.ref} cannot be served: its chat template fails here ({exc})",
                                          param="model") from None
        return Profile(entry.name, entry.ref, "ad_" + entry.content_sha256[:16], folder, entry.method, kind,
                       kind in MIXED_KINDS, prompting.system_prompt, prompting.chat_template, stops)

    def _stops(self, prompting: Prompting) -> frozenset[int]:
        with self.tokenizer_lock:
            return frozenset(stop_ids(self.tokenizer, prompting))
