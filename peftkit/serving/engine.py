"""The serving engine: one base model, an LRU of adapters, and a worker thread that batches every request.

    engine = Engine(ServeSettings("smollm2-135m-instruct", registry="~/.peftkit/registry")).start()
    done = engine.generate(GenerationRequest(model="retail-bot:stable", messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=64, temperature=0))

One worker thread owns the model. Each loop it admits waiting requests (loading their adapters
on a cache miss), runs one forward per lane, picks one token per row and hands text to each
request's callback. Base rows, LoRA rows for any number of adapters (gathered per layer: peftkit.serving.batched_lora) and
prefix/prompt-tuning rows (their virtual tokens enter at prefill) share one lane; DoRA, IA3,
bottleneck and full fine-tune adapters, which change the layers themselves, get a lane each
(see peftkit.serving.kinds). What is loaded, and which model a lane's forward calls, is
peftkit.serving.loaded's; this module schedules.
A hand-written token loop (rather than `model.generate`) is what lets requests join and leave
between steps, stop on their own stop tokens and strings, and be cancelled when a client leaves.

One request must never stop generation for the others: whatever fails in a step (a forward, a
sample from NaN logits, an adapter that does not load) fails the rows of that step and the loop
goes on. Rows are admitted against a memory budget (peftkit.serving.memory): what can never fit is
refused before it is queued, what fits later waits. `state()` says whether the worker is alive and
making progress, for /health and /ready.
"""
from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from typing import Any, Callable

import torch

from peftkit.methods.catalog import DORA, LORA
from peftkit.serving.adapters import BASE, Profile, Resolver
from peftkit.serving.admission import check_lengths, fit_memory
from peftkit.serving.batcher import Row
from peftkit.serving.errors import EngineUnavailableError, GenerationFailedError, ServingError
from peftkit.serving.loaded import LoadedAdapters
from peftkit.serving.memory import Budget, budget_bytes, kv_bytes_per_token
from peftkit.serving.prompts import chat_prompt_ids, completion_prompt_ids
from peftkit.serving.requests import Completion, Event, GenerationRequest, Handle
from peftkit.serving.scheduler import Scheduler
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
        self.runtime: dict[str, Any] = {}
        """The dtype and torch threads the engine runs with, and why (set once the model is loaded)."""
        self.context_length = 0
        self.memory: Budget | None = None
        """Bytes KV caches and loaded adapters may use (set once the model is loaded)."""
        self.stats = collections.Counter()  # steps, tokens, finished_<reason>
        self.batch_sizes: collections.Counter = collections.Counter()  # rows per forward -> forwards
        self.error: BaseException | None = None
        self._failure: str | None = None  # why the worker is gone: the model failed to load, or the thread died
        self._queue: collections.deque[tuple[Row, Handle, Profile]] = collections.deque()  # submitted, not yet picked up
        self._cond = threading.Condition()
        self._scheduler: Scheduler | None = None  # the worker's rows, waiting and running (once the model is loaded)
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
        """Return True while the model is loaded and the worker is alive and making progress."""
        return self.state()[0] == "ready"

    def state(self) -> tuple[str, str]:
        """Return (status, a sentence for clients): loading, ready, failed (load failed or worker died), stopped or stuck."""
        if not self._ready.is_set():
            return "loading", "the model is still loading; poll /ready"
        if self._failure is not None:
            return "failed", self._failure
        if self._stopping:
            return "stopped", "the engine has stopped"
        if not self._thread.is_alive():
            return "failed", "the generation thread has exited; restart the server"
        idle = time.monotonic() - self._scheduler.progress_at
        busy = len(self._queue) + len(self._scheduler.waiting) + self._scheduler.running()
        if busy and idle > self.settings.stall_timeout_s:
            return "stuck", (f"the engine has made no progress for {idle:.0f} s with {busy} requests waiting or running "
                             f"(stall_timeout_s={self.settings.stall_timeout_s:g}); restart the server if it stays so")
        return "ready", "the model is loaded and generating"

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
        if settings.threads:  # set on the worker thread, which runs every forward
            torch.set_num_threads(settings.threads)

        path = resolve_model(settings.base)
        self.tokenizer = load_tokenizer(settings.base)
        self._decoder = load_tokenizer(settings.base)  # the worker's own copy: tokenizers are not shared across threads
        self.model = load_base(settings.base, dtype=settings.dtype, device=settings.device).eval()
        self.adapters.attach(self.model)
        self.runtime = runtime_choice(settings, self.model)
        log.info("serving in %s (%s) with %d torch threads (%s)%s", self.runtime["dtype"], self.runtime["dtype_source"],
                 self.runtime["threads"], self.runtime["threads_source"],
                 "; batch-invariant: each request runs its own forwards" if settings.batch_invariant else "")
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        self.vocab_size = int(self.model.config.vocab_size)
        element = torch.empty((), dtype=self.model.dtype).element_size()
        self.memory = Budget(budget_bytes(settings.kv_cache_fraction, settings.kv_cache_mib, self.model.device),
                             kv_bytes_per_token(self.model.config, element))
        log.info("memory budget for KV caches and adapters: %.0f MiB (%d bytes per cached token)",
                 self.memory.total / (1 << 20), self.memory.per_token)
        try:
            fingerprint = base_fingerprint(path)
        except Exception:  # noqa: BLE001 - without a fingerprint, base checks fall back to trusting the registry
            fingerprint = None
        self.resolver = Resolver(settings.registry, self.served_name, fingerprint, self.tokenizer, self._tok_lock,
                                 element_size=element)
        self._scheduler = Scheduler(settings, self.adapters, self.memory, self.resolver, self.model, self.tokenizer.pad_token_id,
                                    self.stats, self.batch_sizes)
        log.info("prompt-prefix cache: %s", f"{self._scheduler.prefixes.max_bytes / (1 << 20):.0f} MiB of that budget"
                 if self._scheduler.prefixes.enabled else "off")

    # ------------------------------------------------------------ requests

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Return a Handle for the queued request; raises ServingError for unknown models or bad sizes."""
        return self.submit_batch([request], on_event)[0]

    def submit_batch(self, requests: list[GenerationRequest], on_event: Callable[[Event], None] | None = None) -> list[Handle]:
        """Return Handles for requests queued together, so the worker admits them in the same step."""
        status, why = self.state()
        if status != "ready":
            raise EngineUnavailableError(why)
        staged = [self._prepare(r, on_event) for r in requests]
        with self._cond:
            if self._stopping or self._failure is not None:  # nothing would serve these
                raise EngineUnavailableError(self._failure or "the engine has stopped")
            if not (self._queue or self._scheduler.waiting or self._scheduler.running()):
                self._scheduler.progress_at = time.monotonic()  # an idle worker is not stuck: its clock starts now
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
        stats, cache, memory, scheduler = dict(self.stats), self.adapters.cache, self.memory or Budget(0, 0), self._scheduler
        return {"adapter_cache_hits": cache.hits, "adapter_cache_misses": cache.misses,
                "adapter_cache_evictions": cache.evictions, "adapters_loaded": len(cache.loaded()),
                "adapter_cache_capacity": cache.capacity, "generated_tokens": stats.get("tokens", 0),
                "forward_passes": stats.get("steps", 0), "running_requests": scheduler.running() if scheduler else 0,
                "queued_requests": len(self._queue) + (len(scheduler.waiting) if scheduler else 0),
                "engine_ready": int(self.ready), "kv_cache_budget_bytes": memory.total,
                "kv_cache_reserved_bytes": scheduler.reserved_bytes() if scheduler else 0,
                "kv_cache_bytes_per_token": memory.per_token, "adapter_weight_bytes": cache.loaded_bytes(),
                "finished": {k[len("finished_"):]: v for k, v in stats.items() if k.startswith("finished_")},
                "batch_sizes": dict(self.batch_sizes), "runtime": dict(self.runtime),
                **(prefix_counts(scheduler.prefixes) if scheduler else dict.fromkeys(PREFIX_KEYS, 0))}

    def _prepare(self, request: GenerationRequest, on_event) -> tuple[Row, Handle, Profile]:
        request.check()
        profile = self.resolver.resolve(request.model)
        ids, field_name = self._prompt_ids(request, profile)
        check_lengths(self.context_length, len(ids), request.max_tokens, field_name)
        adapter_bytes = self.adapters.cache.sizes.get(profile.key, profile.weight_bytes) if profile.key else 0
        max_tokens = fit_memory(self.memory, self.context_length, len(ids), request.max_tokens, profile.virtual_tokens,
                                adapter_bytes, profile.ref, field_name)
        generator = None
        if request.temperature > 0:
            generator = torch.Generator().manual_seed(request.seed if request.seed is not None else secrets.randbits(63))
        peft_name = profile.key if profile.kind in (LORA, DORA) else BASE
        row = Row(ids, profile.key or BASE, peft_name, max_tokens, profile.stop_ids, request.temperature, request.top_p,
                  generator, reserve=profile.virtual_tokens + len(ids) + max_tokens)
        handle = Handle(profile, len(ids), on_event)
        row.owner = (handle, TextStream(self._decoder, request.stop))
        return row, handle, profile

    def _prompt_ids(self, request: GenerationRequest, profile: Profile) -> tuple[list[int], str]:
        """Return the prompt's ids and the field they came from; sizes are checked before any rendering."""
        max_chars = self.settings.max_prompt_chars or 16 * self.context_length
        if request.messages is not None:
            ids = chat_prompt_ids(self.tokenizer, self._tok_lock, request.messages, profile.system_prompt,
                                  profile.chat_template, max_messages=self.settings.max_messages, max_chars=max_chars)
            return ids, "messages"
        prompt = request.prompt if request.prompt is not None else ""
        return completion_prompt_ids(self.tokenizer, self._tok_lock, prompt, self.vocab_size, max_chars), "prompt"

    # ------------------------------------------------------------ the worker

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - reported by start(), /health and /ready
            self.error, self._failure = exc, f"the model failed to load ({type(exc).__name__}: {exc})"
            self._ready.set()
            return
        self._ready.set()
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:  # noqa: BLE001 - the loop handles every Exception; say what ended it, fail its rows
            log.exception("the engine's generation thread died")
            with self._cond:
                self.error = exc
                self._failure = f"the generation thread died ({type(exc).__name__}: {exc}); restart the server"
            self._fail_all(EngineUnavailableError(self._failure))
            return
        self._fail_all(EngineUnavailableError("the server is shutting down"))

    def _loop(self) -> None:
        scheduler = self._scheduler
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or scheduler.waiting or scheduler.running() or self._stopping)
                if self._stopping:
                    return
                scheduler.waiting.extend(self._queue)
                self._queue.clear()
            try:
                scheduler.admit()
                scheduler.step()
            except Exception as exc:  # noqa: BLE001 - a fault outside the per-row handling: fail the rows in flight
                log.exception("an engine step failed")
                scheduler.fail_all(GenerationFailedError(f"generation failed: {type(exc).__name__}: {exc}"))

    def _fail_all(self, error: ServingError) -> None:
        """Fail every request queued, waiting or running."""
        with self._cond:
            pending = list(self._queue)
            self._queue.clear()
        if self._scheduler is not None:
            self._scheduler.fail_all(error, pending)


PREFIX_KEYS = ("prefix_cache_hits", "prefix_cache_misses", "prefix_cache_tokens_saved", "prefix_cache_bytes",
               "prefix_cache_entries")


def prefix_counts(prefixes) -> dict[str, int]:
    """Return the prompt-prefix cache's counters and gauges for snapshot()."""
    return dict(zip(PREFIX_KEYS, (prefixes.hits, prefixes.misses, prefixes.tokens_saved, prefixes.bytes, len(prefixes))))


def runtime_choice(settings: ServeSettings, model) -> dict[str, Any]:
    """Return the dtype and thread count the engine runs with and why; on a CPU without --threads, measure the threads.

    On a CPU shared with other jobs, fewer intra-op threads than cores keeps OpenMP threads from spinning
    against each other (one thread ran a decode-sized matmul 40x faster than two on a shared 2-core
    machine); on an idle one two can win. peftkit.hardware.decode_threads asks the machine at hand.
    """
    from peftkit.hardware import decode_threads, dtype_source

    source = f"--threads {settings.threads}" if settings.threads else "torch's default"
    if not settings.threads and model.device.type == "cpu":
        config = model.config
        probe = decode_threads(config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size), model.dtype)
        torch.set_num_threads(probe["threads"])
        source = "measured: a decode-sized matmul took " + ", ".join(f"{ms} ms with {n}" for n, ms in probe["ms"].items())
    return {"dtype": str(model.dtype).removeprefix("torch."), "dtype_source": dtype_source(settings.dtype, model.dtype),
            "threads": torch.get_num_threads(), "threads_source": source,
            "batch_invariant": settings.batch_invariant}
