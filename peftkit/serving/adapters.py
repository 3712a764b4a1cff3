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

from peftkit.methods.catalog import CATALOG, LORA, MIXED_KINDS, VIRTUAL, serve_kind_of
from peftkit.prompting import Prompting, read_prompting, stop_ids
from peftkit.serving.errors import AdapterUnavailableError, UnknownModelError, UnsupportedAdapterError

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
    files: tuple[tuple[str, str], ...] = ()
    """The adapter's files as the registry recorded them: (path relative to folder, sha256)."""
    weight_bytes: int = 0
    """What the adapter's weights take once loaded, read from its safetensors headers (a full fine-tune: a whole model;
    plain LoRA: twice, for its copy in the batched forward's stacks)."""
    virtual_tokens: int = 0
    """Prefix/prompt tuning: the virtual tokens put in front of each prompt (they take KV-cache positions too)."""

    @property
    def intact(self) -> bool:
        """Return True while every file of the adapter is in its folder (a registry remove can delete a checkout)."""
        return self.folder is None or all((self.folder / f).is_file() for f, _ in self.files)

    def changed_files(self) -> list[str]:
        """Return the files in the folder whose bytes are not the ones registered (hashes them: call on failures only)."""
        import hashlib

        changed = []
        for path, sha in self.files:
            digest = hashlib.sha256()
            try:
                with open(self.folder / path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
            except OSError:
                changed.append(path)
                continue
            if digest.hexdigest() != sha:
                changed.append(path)
        return changed


class Resolver:
    """Turns the model names clients send into Profiles, through the registry only."""

    def __init__(self, registry_path: str | Path | None, base_name: str, base_fingerprint: str | None,
                 tokenizer: Any, tokenizer_lock: threading.Lock, element_size: int = 4):
        self.registry_path = registry_path
        self.element_size = element_size  # bytes per weight as the server loads them
        self.base_name = base_name
        self.base_fingerprint = base_fingerprint
        self.tokenizer = tokenizer
        self.tokenizer_lock = tokenizer_lock
        self._local = threading.local()  # sqlite connections may not cross threads
        self._profiles: OrderedDict[str, Profile] = OrderedDict()  # content digest -> Profile
        self._refused: OrderedDict[str, str] = OrderedDict()  # content digest -> the error its files got at load
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
        from peftkit.registry import InvalidNameError, RegistryError, UnknownRefError

        try:
            entry = self.registry().show(model)
        except (UnknownRefError, InvalidNameError):
            raise UnknownModelError(f"The model `{model}` does not exist; GET /v1/models lists the base model and "
                                    "the registry's adapters", param="model") from None
        except RegistryError as exc:
            raise AdapterUnavailableError(f"the registry cannot be read now ({exc}); retry", param="model") from None
        return replace(self._profile(entry), name=entry.name, ref=entry.ref)  # label by the name asked for

    def _profile(self, entry) -> Profile:
        """Return the Profile of an entry's files, built once per content digest and rebuilt when its folder is gone."""
        digest = entry.content_sha256
        with self._lock:
            why = self._refused.get(digest)
            cached = self._profiles.get(digest)
            if cached is not None:
                self._profiles.move_to_end(digest)
        if why is not None:
            raise UnsupportedAdapterError(f"adapter {entry.ref} cannot be served: {why}", param="model")
        # The same files may be registered under several names, and the profile kept the folder of the first one
        # asked for: once that name is removed, its checkout is gone. Check the entry asked for out instead.
        if cached is None or not cached.intact:
            cached = self._build(entry)
            with self._lock:
                self._profiles[digest] = cached
                while len(self._profiles) > PROFILE_CACHE:
                    self._profiles.popitem(last=False)
        return cached

    def forget(self, key: str) -> None:
        """Drop the profile of an adapter (by its key), so the next request looks its files up in the registry again."""
        with self._lock:
            for digest in [d for d, p in self._profiles.items() if p.key == key]:
                del self._profiles[digest]

    def refuse(self, profile: Profile, error: Exception) -> None:
        """Remember why an adapter's files cannot be served here, so later requests for them get 400 at once."""
        key, why = profile.key, str(error).removeprefix(f"adapter {profile.ref} cannot be served: ")
        with self._lock:
            for digest in [d for d, p in self._profiles.items() if p.key == key]:
                del self._profiles[digest]
                self._refused[digest] = why
            while len(self._refused) > PROFILE_CACHE:
                self._refused.popitem(last=False)

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
        folder = self._checkout(entry)
        config, kind = self._read_kind(entry, folder)
        prompting = read_prompting(folder, entry.config if isinstance(entry.config, dict) else None)
        try:
            stops = self._stops(prompting)
        except Exception as exc:  # noqa: BLE001 - an adapter's own template failing here refuses that adapter only
            raise UnsupportedAdapterError(f"adapter {entry.ref} cannot be served: its chat template fails here "
                                          f"({type(exc).__name__}: {exc})", param="model") from None
        from peftkit.serving.memory import weights_bytes

        virtual = config.get("num_virtual_tokens") if kind == VIRTUAL else 0
        weight_bytes = weights_bytes(folder, self.element_size)
        if kind == LORA:  # peft's copy plus the batched forward's stacked copy (peftkit.serving.batched_lora)
            weight_bytes *= 2
        return Profile(entry.name, entry.ref, "ad_" + entry.content_sha256[:16], folder, entry.method, kind,
                       kind in MIXED_KINDS, prompting.system_prompt, prompting.chat_template, stops,
                       tuple((f.path, f.sha256) for f in entry.files), weight_bytes,
                       virtual if isinstance(virtual, int) and virtual > 0 else 0)

    def _checkout(self, entry) -> Path:
        from peftkit.registry import RegistryError

        try:
            folder = Path(self.registry().checkout(entry.ref))
        except (RegistryError, OSError) as exc:
            raise AdapterUnavailableError(f"adapter {entry.ref}: its files cannot be checked out of the registry ({exc}); "
                                          f"run `peftkit registry verify {entry.ref}`", param="model") from None
        missing = [f.path for f in entry.files if not (folder / f.path).is_file()]
        if missing:
            raise AdapterUnavailableError(f"adapter {entry.ref}: its registry checkout {folder} lacks {', '.join(missing)}; "
                                          f"run `peftkit registry verify {entry.ref}`", param="model")
        return folder

    def _read_kind(self, entry, folder: Path) -> tuple[dict, str]:
        """Return the adapter's config (empty for a full fine-tune) and how the engine runs it."""
        from peftkit.methods.full import is_full_finetune

        if is_full_finetune(folder):
            return {}, serve_kind_of(None)
        try:
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise UnsupportedAdapterError(f"adapter {entry.ref} cannot be served: its adapter_config.json cannot be read "
                                          f"({type(exc).__name__}: {exc})", param="model") from None
        kind = serve_kind_of(config) if isinstance(config, dict) else None
        if kind is None:
            peft_type = config.get("peft_type") if isinstance(config, dict) else None
            raise UnsupportedAdapterError(f"adapter {entry.ref} cannot be served: its peft_type {peft_type!r} "
                                          f"is not one this server runs ({', '.join(SERVED_PEFT_TYPES)}, or a full "
                                          "fine-tune)", param="model")
        return config, kind

    def _stops(self, prompting: Prompting) -> frozenset[int]:
        with self.tokenizer_lock:
            return frozenset(stop_ids(self.tokenizer, prompting))
