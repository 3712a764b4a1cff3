"""The serving engine: one base model, an LRU of adapters, and a worker thread that batches every request.

    engine = Engine(ServeSettings("smollm2-135m-instruct", registry="~/.peftkit/registry")).start()
    done = engine.generate(GenerationRequest(model="retail-bot:stable", messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=64, temperature=0))

One worker thread owns the model. Each loop it admits waiting requests (loading their adapters
on a cache miss), runs one forward per lane, picks one token per row and hands text to each
request's callback. Base rows, LoRA rows for any number of adapters (peft's `adapter_names`) and
prefix/prompt-tuning rows (their virtual tokens enter at prefill) share one lane; DoRA, IA3,
bottleneck and full fine-tune adapters, which change the layers themselves, get a lane each
(see peftkit.serving.kinds). What is loaded, and which model a lane's forward calls, is
peftkit.serving.loaded's; this module schedules.
A hand-written token loop (rather than `model.generate`) is what lets requests join and leave
between steps, stop on their own stop tokens and strings, and be cancelled when a client leaves.
"""
from __future__ import annotations

import collections
import logging
import secrets
import threading
from typing import Any, Callable

import torch

from peftkit.methods.catalog import DORA, LORA, VIRTUAL
from peftkit.serving.adapters import BASE, Profile, Resolver
from peftkit.serving.batcher import Lane, Row, pick_tokens
from peftkit.serving.errors import (ContextLengthError, EngineUnavailableError, GenerationFailedError, InvalidRequestError,
                                    ServingError)
from peftkit.serving.loaded import MIXED, LoadedAdapters
from peftkit.serving.prompts import chat_prompt_ids, completion_prompt_ids
from peftkit.serving.requests import Completion, Event, GenerationRequest, Handle
from peftkit.serving.settings import ServeSettings
from peftkit.serving.stream import TextStream

__all__ = ["Completion", "Engine", "Event", "GenerationRequest", "Handle"]
log = logging.getLogger(__name__)


class Engine:
    """One base model served with many adapters; thread-safe submit, one worker thread generating."""

    def __init__(self, settings: ServeSettings | None = None):
        self.settings = settings = settings or ServeSettings()
        self.served_name = settings.base_name
        self.adapters = LoadedAdapters(settings.max_loaded_adapters, dtype=settings.dtype, device=settings.device)
        self.context_length = 0
        self.stats = collections.Counter()  # steps, tokens, finished_<reason>
        self.batch_sizes: collections.Counter = collections.Counter()  # rows per forward -> forwards
        self.error: BaseException | None = None
        self._queue: collections.deque[tuple[Row, Handle, Profile]] = collections.deque()
        self._cond = threading.Condition()
        self._waiting: list[tuple[Row, Handle, Profile]] = []
        self._lanes: dict[str, Lane] = {}
        self._ready = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.model = self.tokenizer = self.resolver = None
        self._tok_lock = threading.Lock()

    # ------------------------------------------------------------ life cycle

    def start(self, wait: bool = True) -> "Engine":
        """Start the worker (it loads the model first); with wait, return once it is ready or raise its error."""
        self._thread = threading.Thread(target=self._run, name="peftkit-engine", daemon=True)
        self._thread.start()
        if wait:
            self._ready.wait()
            if self.error is not None:
                raise self.error
        return self

    @property
    def ready(self) -> bool:
        """Return True while the model is loaded and the worker is running."""
        return self._ready.is_set() and self.error is None and not self._stopping and bool(self._thread and self._thread.is_alive())

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker; requests still queued or running end with an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _load(self) -> None:
        from peftkit.fingerprint import base_fingerprint
        from peftkit.models import load_base, load_tokenizer, resolve_model

        import peft  # noqa: F401 - imported now (seconds) rather than on the first adapter request

        settings = self.settings
        if settings.threads:
            # Set on the worker thread, which runs every forward. On a CPU shared with other jobs, fewer intra-op
            # threads than cores keeps OpenMP threads from spinning against each other (measured on a shared
            # 2-core machine: one thread ran a decode-sized matmul 40x faster than two).
            torch.set_num_threads(settings.threads)

        path = resolve_model(settings.base)
        self.tokenizer = load_tokenizer(settings.base)
        self._decoder = load_tokenizer(settings.base)  # the worker's own copy: tokenizers are not shared across threads
        self.model = load_base(settings.base, dtype=settings.dtype, device=settings.device).eval()
        self.adapters.attach(self.model)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        self.vocab_size = int(self.model.config.vocab_size)
        try:
            fingerprint = base_fingerprint(path)
        except Exception:  # noqa: BLE001 - without a fingerprint, base checks fall back to trusting the registry
            fingerprint = None
        self.resolver = Resolver(settings.registry, self.served_name, fingerprint, self.tokenizer, self._tok_lock)

    # ------------------------------------------------------------ requests

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Return a Handle for the queued request; raises ServingError for unknown models or bad sizes."""
        return self.submit_batch([request], on_event)[0]

    def submit_batch(self, requests: list[GenerationRequest], on_event: Callable[[Event], None] | None = None) -> list[Handle]:
        """Return Handles for requests queued together, so the worker admits them in the same step."""
        if not self.ready:
            raise EngineUnavailableError("the model is still loading" if not self._ready.is_set() else "the engine has stopped")
        staged = [self._prepare(r, on_event) for r in requests]
        with self._cond:
            if self._stopping:  # the worker may already have failed what was queued; nothing would serve these
                raise EngineUnavailableError("the engine has stopped")
            self._queue.extend(staged)
            self._cond.notify_all()
        return [handle for _, handle, _ in staged]

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> Completion:
        """Return the finished completion of one request (blocking)."""
        return self.submit(request).result(timeout)

    def list_models(self) -> list[dict[str, Any]]:
        """Return the base and every servable registry reference as {id, ref, method, ...} dicts."""
        out = [{"id": self.served_name, "ref": None, "method": "base", "domain": None, "tags": []}]
        entries = self.resolver.registry().list()
        latest = {}
        for e in entries:
            if latest.get(e.name) is None or e.version > latest[e.name].version:
                latest[e.name] = e
        for e in entries:
            if self.resolver.servable(e) is not None:
                continue
            ids = [f"{e.name}@{e.version}"] + [f"{e.name}:{t}" for t in e.tags] + ([e.name] if latest[e.name] is e else [])
            out += [{"id": i, "ref": e.ref, "method": e.method, "domain": e.domain, "tags": e.tags} for i in ids]
        return out

    def snapshot(self) -> dict[str, Any]:
        """Return the engine's counters and gauges now (safe to call from any thread)."""
        stats, cache = dict(self.stats), self.adapters.cache
        return {"adapter_cache_hits": cache.hits, "adapter_cache_misses": cache.misses,
                "adapter_cache_evictions": cache.evictions, "adapters_loaded": len(cache.loaded()),
                "adapter_cache_capacity": cache.capacity, "generated_tokens": stats.get("tokens", 0),
                "forward_passes": stats.get("steps", 0), "running_requests": self._running(),
                "queued_requests": len(self._queue) + len(self._waiting), "engine_ready": int(self.ready),
                "finished": {k[len("finished_"):]: v for k, v in stats.items() if k.startswith("finished_")},
                "batch_sizes": dict(self.batch_sizes)}

    def _prepare(self, request: GenerationRequest, on_event) -> tuple[Row, Handle, Profile]:
        profile = self.resolver.resolve(request.model)
        with self._tok_lock:
            if request.messages is not None:
                ids = chat_prompt_ids(self.tokenizer, request.messages, profile.system_prompt, profile.chat_template)
                field_name = "messages"
            else:
                ids = completion_prompt_ids(self.tokenizer, request.prompt if request.prompt is not None else "", self.vocab_size)
                field_name = "prompt"
        self.check_lengths(len(ids), request.max_tokens, field_name)
        max_tokens = request.max_tokens or self.context_length - len(ids)
        generator = None
        if request.temperature > 0:
            generator = torch.Generator().manual_seed(request.seed if request.seed is not None else secrets.randbits(63))
        peft_name = profile.key if profile.kind in (LORA, DORA) else BASE
        row = Row(ids, profile.key or BASE, peft_name, max_tokens, profile.stop_ids, request.temperature, request.top_p,
                  generator)
        handle = Handle(profile, len(ids), on_event)
        row.owner = (handle, TextStream(self._decoder, request.stop))
        return row, handle, profile

    def check_lengths(self, prompt_tokens: int, max_tokens: int | None, field_name: str) -> None:
        """Raise InvalidRequestError when the prompt, or prompt plus max_tokens, does not fit the context."""
        ctx = self.context_length
        if prompt_tokens == 0:
            raise InvalidRequestError(f"the {field_name} is empty", param=field_name)
        if prompt_tokens >= ctx:
            raise ContextLengthError(f"This model's maximum context length is {ctx} tokens, but the {field_name} take "
                                      f"{prompt_tokens} tokens; shorten the {field_name}", param=field_name)
        if max_tokens is not None and prompt_tokens + max_tokens > ctx:
            raise ContextLengthError(f"This model's maximum context length is {ctx} tokens. However, you requested "
                                      f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {field_name}, "
                                      f"{max_tokens} in the completion); reduce max_tokens to at most "
                                      f"{ctx - prompt_tokens}", param="max_tokens")

    # ------------------------------------------------------------ the worker

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - reported by start() and /ready
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        with torch.inference_mode():
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._queue or self._waiting or self._running() or self._stopping)
                    if self._stopping:
                        break
                    self._waiting.extend(self._queue)
                    self._queue.clear()
                self._admit()
                self._step()
        self._fail_all(EngineUnavailableError("the server is shutting down"))

    def _running(self) -> int:
        return sum(len(lane.rows) for lane in list(self._lanes.values()))  # list(): other threads call this too

    def _admit(self) -> None:
        joining: dict[tuple[str, str | None], list[Row]] = {}
        still_waiting = []
        for row, handle, profile in self._waiting:
            if handle.cancelled.is_set():
                self._finish(row, "cancelled")
                continue
            if self._running() + sum(map(len, joining.values())) >= self.settings.max_batch_size:
                still_waiting.append((row, handle, profile))
                continue
            if profile.key is not None:
                try:
                    if not self.adapters.cache.acquire(profile):  # every loaded adapter is in use: wait for a slot
                        still_waiting.append((row, handle, profile))
                        continue
                    row.pinned = True
                except Exception as exc:  # noqa: BLE001 - a broken adapter fails its request, not the server
                    log.exception("loading adapter %s failed", profile.ref)
                    self._finish(row, "error", GenerationFailedError(f"adapter {profile.ref} failed to load: {exc}"))
                    continue
            if profile.kind == VIRTUAL:
                row.virtual = self.adapters.virtual[profile.key]
            lane = MIXED if profile.key is None or (profile.mixable and self.settings.mix) else profile.key
            # Rows prefilled together share their virtual tokens (or have none).
            joining.setdefault((lane, profile.key if profile.kind == VIRTUAL else None), []).append(row)
        self._waiting = still_waiting
        for (name, _), rows in joining.items():
            lane = self._lanes.get(name)
            if lane is None:
                lane = self._lanes[name] = Lane(self.adapters.forward_for(name), self.tokenizer.pad_token_id, self.model.device,
                                                embed=self.model.get_input_embeddings())
            self._run_lane(lane, rows, lambda: lane.add(rows))

    def _step(self) -> None:
        for name, lane in list(self._lanes.items()):
            if lane.rows:
                self._run_lane(lane, list(lane.rows), lambda: lane.step([r.output_ids[-1] for r in lane.rows]))
            if not lane.rows:
                del self._lanes[name]

    def _run_lane(self, lane: Lane, fed: list[Row], forward: Callable[[], torch.Tensor]) -> None:
        """Run one forward for the rows fed (joining rows, or the whole lane) and advance each by a token."""
        try:
            logits = forward()
        except Exception as exc:  # noqa: BLE001 - fail the rows of this forward, keep serving the others
            log.exception("forward pass failed")
            for r in fed:
                self._finish(r, "error", GenerationFailedError(f"generation failed: {type(exc).__name__}: {exc}"))
            lane.remove(fed)  # a failed prefill never joined; a failed step leaves the lane's cache unusable
            return
        self.stats["steps"] += 1
        self.batch_sizes[len(fed)] += 1
        finished = []
        for row, token in zip(fed, pick_tokens(logits, fed)):
            if self._advance(row, token):
                finished.append(row)
        lane.remove(finished)

    def _advance(self, row: Row, token: int) -> bool:
        """Record one token for a row and emit its text; return True when the row is finished."""
        handle, text = row.owner
        row.output_ids.append(token)
        handle.token_ids.append(token)
        self.stats["tokens"] += 1
        if handle.cancelled.is_set():
            self._finish(row, "cancelled")
            return True
        if token in row.stop_ids:
            self._finish(row, "stop")
            return True
        delta, hit_stop = text.push(token)
        if hit_stop:
            handle.emit(Event(delta))
            self._finish(row, "stop")
            return True
        if len(row.output_ids) >= row.max_tokens:
            handle.emit(Event(delta))
            self._finish(row, "length")
            return True
        if delta:
            handle.emit(Event(delta))
        return False

    def _finish(self, row: Row, reason: str, error: ServingError | None = None) -> None:
        handle, text = row.owner
        if handle.done.is_set():
            return
        tail = text.flush() if reason in ("stop", "length") else ""
        self.stats[f"finished_{reason}"] += 1
        if row.pinned:
            row.pinned = False
            self.adapters.cache.release(row.adapter)
        handle.emit(Event(tail, reason, len(row.output_ids), error))

    def _fail_all(self, error: ServingError) -> None:
        with self._cond:
            pending = list(self._queue) + self._waiting
            self._queue.clear()
        for row, _, _ in pending:
            self._finish(row, "error", error)
        for lane in self._lanes.values():
            for row in lane.rows:
                self._finish(row, "error", error)
        self._lanes.clear()
