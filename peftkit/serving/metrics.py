"""Prometheus metrics for the server: HTTP counters and latencies, tokens, per-adapter counts, engine state.

Each app gets its own CollectorRegistry (several servers in one process, as in tests, never clash).
Label values come only from fixed sets or from registry names the engine resolved; the number of
adapter labels is capped and the rest count under "other", so clients cannot grow the series.
"""
from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
OTHER = "other"
# The engine's snapshot keys read at scrape time, with their help text.
ENGINE_COUNTERS = {"adapter_cache_hits": "Requests whose adapter was already loaded",
                   "adapter_cache_misses": "Requests that loaded their adapter",
                   "adapter_cache_evictions": "Adapters unloaded to make room",
                   "generated_tokens": "Tokens generated, all requests",
                   "forward_passes": "Model forward passes (prefill and decode steps)",
                   "prefix_cache_hits": "Requests that started from a cached prompt head",
                   "prefix_cache_misses": "Requests that found no cached prompt head",
                   "prefix_cache_tokens_saved": "Prompt tokens not prefilled because their keys and values were cached"}
ENGINE_GAUGES = {"adapters_loaded": "Adapters loaded in the model now",
                 "adapter_cache_capacity": "Most adapters kept loaded (--max-loaded-adapters)",
                 "running_requests": "Requests generating now (rows in the batch)",
                 "queued_requests": "Requests waiting for a batch slot or an adapter slot",
                 "engine_ready": "1 when the model is loaded and the worker runs and makes progress",
                 "kv_cache_budget_bytes": "Memory KV caches and loaded adapters may use (--kv-cache-mib / --kv-cache-fraction)",
                 "kv_cache_reserved_bytes": "KV-cache memory the running requests can reach (rows x widest row, per batch)",
                 "kv_cache_bytes_per_token": "KV-cache bytes of one cached token of one request",
                 "adapter_weight_bytes": "Memory the loaded adapters' weights take (a full fine-tune is a whole model)",
                 "prefix_cache_bytes": "Memory the cached prompt heads take (part of the KV-cache budget)",
                 "prefix_cache_entries": "Prompt heads cached now"}


class Metrics:
    """The server's metrics, registered in a registry of their own."""

    def __init__(self, engine: Any, max_adapter_labels: int = 32):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("peftkit_http_requests", "HTTP requests by route and status code", ["route", "status"], registry=r)
        self.latency = Histogram("peftkit_http_request_duration_seconds", "Time from request to the end of the response",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("peftkit_time_to_first_token_seconds", "Time from request to the first generated text",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_requests = Counter("peftkit_adapter_requests", "Generation requests by adapter and finish reason",
                                        ["adapter", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("peftkit_prompt_tokens", "Prompt tokens by adapter", ["adapter"], registry=r)
        self.completion_tokens = Counter("peftkit_completion_tokens", "Generated tokens by adapter", ["adapter"], registry=r)
        self.in_flight = Gauge("peftkit_requests_in_flight", "Generation requests admitted and not finished", registry=r)
        self.rejected = Counter("peftkit_requests_rejected", "Requests refused by a limit", ["reason"], registry=r)
        r.register(EngineCollector(engine))
        self.max_adapter_labels = max_adapter_labels
        self._labels: set[str] = set()
        self._lock = threading.Lock()

    def adapter_label(self, name: str) -> str:
        """Return the label for an adapter name: itself while under the cap, else "other"."""
        with self._lock:
            if name in self._labels:
                return name
            if len(self._labels) < self.max_adapter_labels:
                self._labels.add(name)
                return name
        return OTHER

    def record_generation(self, adapter: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one finished generation request for its adapter."""
        label = self.adapter_label(adapter)
        self.adapter_requests.labels(label, finish_reason).inc()
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        self.completion_tokens.labels(label).inc(completion_tokens)


def route_label(path: str) -> str:
    """Return the path when it is one of the server's routes, else "other" (unknown paths are unbounded)."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return path if path in ROUTES else OTHER


class EngineCollector:
    """Reads the engine's counters at scrape time (the engine itself knows nothing of Prometheus)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self):
        snap = self.engine.snapshot()
        for family, series in ((CounterMetricFamily, ENGINE_COUNTERS), (GaugeMetricFamily, ENGINE_GAUGES)):
            for name, doc in series.items():
                yield family(f"peftkit_{name}", doc, value=snap[name])
        finished = CounterMetricFamily("peftkit_engine_requests_finished", "Engine requests by finish reason", labels=["reason"])
        for reason, n in sorted(snap["finished"].items()):
            finished.add_metric([reason], n)
        yield finished
        sizes = snap["batch_sizes"]
        buckets = [(str(bound), sum(n for size, n in sizes.items() if size <= bound)) for bound in BATCH_BUCKETS]
        buckets.append(("+Inf", sum(sizes.values())))
        yield HistogramMetricFamily("peftkit_batch_rows", "Rows per forward pass", buckets=buckets,
                                    sum_value=sum(size * n for size, n in sizes.items()))
        if snap["runtime"]:
            yield InfoMetricFamily("peftkit_engine", "The dtype and torch threads the engine runs with, and why",
                                   value={k: str(v) for k, v in snap["runtime"].items()})
