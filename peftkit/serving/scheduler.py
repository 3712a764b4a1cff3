"""The engine's worker side: which rows run together, admitted against the batch size, adapter slots and memory.

Each step the worker (peftkit.serving.engine) calls `admit` then `step`. Rows that fit join a lane
(peftkit.serving.batcher) and are prefilled, at most `max_prefill_tokens` of prompt per step (the
first always goes), so that requests arriving together do not stall the rows decoding; each lane then runs one forward and every row in it
advances by a token. A row waits while the batch is full, while every adapter slot is pinned, or
while its KV cache would not fit the memory budget beside the lanes running now (and then the rows
behind it wait too, so a large request is not starved). What fails is kept to the rows it touched:
an adapter that does not load fails its requests, a forward fails its lane's rows, a bad sample or a
bug in one row's bookkeeping fails that row. An adapter whose files do not fit is remembered by the
resolver and refused at submit from then on; one whose checkout vanished is looked up again.
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable

import torch

from peftkit.methods.catalog import VIRTUAL
from peftkit.serving.adapters import Profile, Resolver
from peftkit.serving.batcher import Lane, Row, SoloLane, pick_tokens
from peftkit.serving.errors import (AdapterMismatchError, AdapterUnavailableError, GenerationFailedError, MemoryBudgetError,
                                    ServingError)
from peftkit.serving.loaded import MIXED, LoadedAdapters
from peftkit.serving.memory import MIB, Budget
from peftkit.serving.prefix_cache import PrefixCache
from peftkit.serving.requests import Event, Handle
from peftkit.serving.settings import ServeSettings

log = logging.getLogger(__name__)
Waiting = tuple[Row, Handle, Profile]


class Scheduler:
    """Rows waiting and running on the worker thread; other threads only read their counts."""

    def __init__(self, settings: ServeSettings, adapters: LoadedAdapters, memory: Budget, resolver: Resolver, model: Any,
                 pad_id: int, stats: collections.Counter, batch_sizes: collections.Counter):
        self.settings, self.adapters, self.memory, self.resolver = settings, adapters, memory, resolver
        self.model, self.pad_id = model, pad_id
        self.stats = stats  # steps, tokens, finished_<reason> (the engine's, read by /metrics)
        self.batch_sizes = batch_sizes  # rows per forward -> forwards
        self.waiting: list[Waiting] = []
        self.lanes: dict[str, Lane] = {}
        self.progress_at = time.monotonic()
        """When a forward last finished or an adapter was loaded (what /health's stuck check reads)."""
        self.prefixes = PrefixCache(prefix_cache_bytes(settings, memory), memory.per_token)

    def running(self) -> int:
        """Return the rows being generated now (safe from any thread)."""
        return sum(len(lane.rows) for lane in list(self.lanes.values()))

    def reserved_bytes(self) -> int:
        """Return the KV-cache bytes the running rows can reach (safe from any thread)."""
        return self.memory.kv_bytes([[r.reserve for r in list(lane.rows)] for lane in list(self.lanes.values())])

    def admit(self) -> None:
        """Move waiting rows into lanes while the batch size, adapter slots and memory allow, and prefill them."""
        joining: dict[tuple[str, str | None], list[Row]] = {}
        still_waiting, blocked, prefill = [], False, 0
        for row, handle, profile in self.waiting:
            if handle.cancelled.is_set():
                self.finish(row, "cancelled")
                continue
            full = blocked or self.running() + sum(map(len, joining.values())) >= self.settings.max_batch_size
            if not full and joining and prefill + len(row.prompt_ids) > self.settings.max_prefill_tokens:
                full = blocked = True  # this step's prefill budget is spent: the rows decoding get their token first
            placed = "full" if full else self._try_place(row, profile, joining)
            prefill += len(row.prompt_ids) - row.cached if placed == "joined" else 0
            if placed != "joined" and placed != "failed":
                still_waiting.append((row, handle, profile))
                blocked = blocked or placed == "memory"  # first come, first served: a large request is not starved
        self.waiting = still_waiting
        for (name, _), rows in joining.items():
            lane = self.lanes.get(name)
            if lane is None:
                kind = SoloLane if self.settings.batch_invariant else Lane
                lane = self.lanes[name] = kind(self.adapters.forward_for(name), self.pad_id, self.model.device,
                                               embed=self.model.get_input_embeddings())
            self._run_lane(lane, rows, lambda: lane.add(rows))
            self._keep_heads(lane, rows)

    def _try_place(self, row: Row, profile: Profile, joining: dict) -> str:
        """Return "joined" (the row prefills this step), "memory" or "slot" (it waits), or "failed" (it was finished)."""
        try:
            return self._place(row, profile, joining)
        except Exception as exc:  # noqa: BLE001 - an adapter that does not load fails its requests, not the server
            self.finish(row, "error", self._adapter_error(profile, exc))
            return "failed"

    def _place(self, row: Row, profile: Profile, joining: dict) -> str:
        lane = MIXED if profile.key is None or (profile.mixable and self.settings.mix) else profile.key
        kv, cache = self._kv_bytes_with(lane, row, joining), self.adapters.cache
        self.prefixes.shrink(self.memory.total - kv - cache.pinned_bytes(profile))  # cached heads go before a row waits
        if kv + cache.pinned_bytes(profile) > self.memory.total:
            if not self.lanes and not joining:  # alone and still too big (its adapter weighs more than estimated)
                raise MemoryBudgetError(f"this request's KV cache ({row.reserve} positions) and adapter {profile.ref} "
                                        f"do not fit the memory budget of {self.memory.total / MIB:.2f} MiB; lower "
                                        "max_tokens", param="max_tokens")
            return "memory"
        if profile.key is not None and profile.key not in cache.sizes and not profile.intact:
            # Its checkout went away (a registry remove of another name for the same files): look it up again.
            self.resolver.forget(profile.key)
            profile = self.resolver.resolve(profile.ref)
        cache.make_room(self.memory.total - kv - self.prefixes.bytes, profile)
        if profile.key is not None:
            if not cache.acquire(profile):  # every loaded adapter is in use: wait for a slot
                return "slot"
            row.pinned = True
            self.progress_at = time.monotonic()
        if profile.kind == VIRTUAL:
            row.virtual = self.adapters.virtual[profile.key]
        hit = self.prefixes.lookup(row.adapter, row.prompt_ids)
        if hit is not None:  # its head's keys and values (after any virtual tokens) are cached: prefill the rest
            row.virtual, row.cached = hit.start, hit.tokens
        # Rows prefilled together share their virtual tokens and cached head (or have none).
        joining.setdefault((lane, id(row.virtual) if row.virtual is not None else None), []).append(row)
        return "joined"

    def _keep_heads(self, lane: Lane, rows: list[Row]) -> None:
        """Keep the heads these rows' prompts share with their adapters' previous prompts (peftkit.serving.prefix_cache)."""
        for row in rows:
            length = self.prefixes.worth_keeping(row.adapter, row.prompt_ids, row.cached)
            if not length or row not in lane.rows:  # nothing new to keep, or the row already finished
                continue
            virtual = row.virtual.length - row.cached if row.virtual is not None else 0  # the adapter's own tokens
            room = self.memory.total - self.reserved_bytes() - self.adapters.cache.loaded_bytes()
            try:
                self.prefixes.put(row.adapter, row.prompt_ids[:length], lane.head(row, virtual + length), room)
            except Exception:  # noqa: BLE001 - a head not kept costs a later prefill, never this request
                log.exception("keeping a prompt head failed")

    def _kv_bytes_with(self, lane_name: str, row: Row, joining: dict) -> int:
        """Return the KV bytes every lane could reach with this row added to its lane."""
        lanes = {name: [r.reserve for r in lane.rows] for name, lane in self.lanes.items()}
        for (name, _), rows in joining.items():
            lanes.setdefault(name, []).extend(r.reserve for r in rows)
        lanes.setdefault(lane_name, []).append(row.reserve)
        return self.memory.kv_bytes(lanes.values())

    def _adapter_error(self, profile: Profile, exc: Exception) -> ServingError:
        """Return the error a request gets when its adapter cannot be loaded; the resolver learns what to do next time."""
        changed = profile.changed_files() if isinstance(exc, AdapterMismatchError) else []
        if isinstance(exc, AdapterMismatchError) and not changed:
            self.resolver.refuse(profile, exc)  # the registered files never fit: later requests get 400 at once
            return exc
        if changed:  # not what was registered: a damaged checkout, not a misfit adapter
            exc = AdapterUnavailableError(f"adapter {profile.ref}: {', '.join(changed)} in its registry checkout "
                                          f"differ from what was registered; run `peftkit registry verify {profile.ref}`",
                                          param="model")
        if profile.key is not None:
            self.resolver.forget(profile.key)  # the next request looks its files up in the registry again
        if isinstance(exc, ServingError):
            return exc
        if profile.key is not None and not profile.intact:
            return AdapterUnavailableError(f"adapter {profile.ref}: its files were removed from the registry while the "
                                           "request waited; retry", param="model")
        log.error("loading adapter %s failed", profile.ref, exc_info=exc)
        return GenerationFailedError(f"adapter {profile.ref} failed to load: {type(exc).__name__}: {exc}")

    def step(self) -> None:
        """Run one decode forward per lane and advance each of its rows by a token."""
        for name, lane in list(self.lanes.items()):
            if lane.rows:
                self._run_lane(lane, list(lane.rows), lambda: lane.step([r.output_ids[-1] for r in lane.rows]))
            if not lane.rows:
                del self.lanes[name]

    def _run_lane(self, lane: Lane, fed: list[Row], forward: Callable[[], torch.Tensor]) -> None:
        """Run one forward for the rows fed (joining rows, or the whole lane) and advance each by a token."""
        try:
            tokens = pick_tokens(forward(), fed)
        except Exception as exc:  # noqa: BLE001 - fail the rows of this forward, keep serving the others
            log.exception("forward pass failed")
            self._fail_rows(lane, fed, GenerationFailedError(f"generation failed: {type(exc).__name__}: {exc}"))
            return
        self.progress_at = time.monotonic()
        if lane.solo:  # one forward per row
            self.stats["steps"] += len(fed)
            self.batch_sizes[1] += len(fed)
        else:
            self.stats["steps"] += 1
            self.batch_sizes[len(fed)] += 1
        finished = []
        for row, token in zip(fed, tokens):
            try:
                if token is None:
                    raise FloatingPointError("the model's next-token scores for this request hold NaN or inf")
                done = self._advance(row, token)
            except Exception as exc:  # noqa: BLE001 - this row alone fails
                log.warning("request failed in a step: %s: %s", type(exc).__name__, exc)
                self.finish(row, "error", GenerationFailedError(f"generation failed: {type(exc).__name__}: {exc}"))
                done = True
            if done:
                finished.append(row)
        self._drop(lane, finished)

    def _advance(self, row: Row, token: int) -> bool:
        """Record one token for a row and emit its text; return True when the row is finished."""
        handle, text = row.owner
        row.output_ids.append(token)
        handle.token_ids.append(token)
        self.stats["tokens"] += 1
        if handle.cancelled.is_set():
            self.finish(row, "cancelled")
            return True
        if token in row.stop_ids:
            self.finish(row, "stop")
            return True
        delta, hit_stop = text.push(token)
        if hit_stop:
            handle.emit(Event(delta))
            self.finish(row, "stop")
            return True
        if len(row.output_ids) >= row.max_tokens:
            handle.emit(Event(delta))
            self.finish(row, "length")
            return True
        if delta:
            handle.emit(Event(delta))
        return False

    def finish(self, row: Row, reason: str, error: ServingError | None = None) -> None:
        """End a row's request with its last event (never raises: a failing callback must not stop the worker)."""
        handle, text = row.owner
        if handle.done.is_set():
            return
        try:
            tail = text.flush() if reason in ("stop", "length") else ""
        except Exception:  # noqa: BLE001 - the text held back is lost, the ending is not
            tail = ""
        self.stats[f"finished_{reason}"] += 1
        if row.pinned:
            row.pinned = False
            self.adapters.cache.release(row.adapter)
        try:
            handle.emit(Event(tail, reason, len(row.output_ids), error))
        except Exception:  # noqa: BLE001
            log.exception("delivering the end of a request failed")

    def _fail_rows(self, lane: Lane, rows: list[Row], error: ServingError) -> None:
        for row in rows:
            self.finish(row, "error", error)
        self._drop(lane, rows)

    def _drop(self, lane: Lane, rows: list[Row]) -> None:
        """Remove rows from a lane; if even that fails, its cache cannot be trusted, so every row of it fails."""
        try:
            lane.remove(rows)
        except Exception as exc:  # noqa: BLE001
            log.exception("removing rows from a batch failed")
            for row in lane.rows:
                self.finish(row, "error", GenerationFailedError(f"generation failed: {type(exc).__name__}: {exc}"))
            lane.clear()

    def fail_all(self, error: ServingError, pending: list[Waiting] = ()) -> None:
        """Fail every row running or waiting, and the pending ones given (never picked up)."""
        rows = [row for row, _, _ in [*self.waiting, *pending]]
        self.waiting = []
        for lane in list(self.lanes.values()):
            rows += lane.rows
        self.lanes.clear()
        for row in rows:
            self.finish(row, "error", error)


def prefix_cache_bytes(settings: ServeSettings, memory: Budget) -> int:
    """Return the bytes cached prompt heads may take: --prefix-cache-mib, else an eighth of the memory budget; none in
    --batch-invariant mode (a cached head would make a row's answer depend on the requests before it)."""
    if settings.batch_invariant:
        return 0
    if settings.prefix_cache_mib is not None:
        return int(settings.prefix_cache_mib * MIB)
    return memory.total // 8
