"""Generated hostile requests against a live server: no 5xx, no hang, bounded memory, and the engine still answers.

The strategies are peftkit.bench.fuzz_http's; this is its short, derandomized run (the same requests every time).
The long run is `python -m peftkit.bench.fuzz_http --requests 2000 --seed N` (figures in docs/reliability.md).
"""
from __future__ import annotations

import time

import httpx
import pytest
from serving_helpers import chat

from peftkit.bench.fuzz_http import KEY, Campaign, fuzz

REQUESTS = 400
TIMEOUT_S = 30.0  # per request; the slowest legitimate one (512 tokens on the tiny model) takes a few seconds
RSS_GROWTH_MIB = 300.0
MODELS = ["tiny", "lora0", "lora0:stable", "lora0@2", "lora1", "dora0", "ia3", "prefix0", "prefix-mlp", "prompt0",
          "bottleneck0", "full0"]


@pytest.fixture(scope="module")
def fuzzed(tiny_model_dir, registry_dir):
    """Return (engine, URL) of a live server with an API key and the default limits, over an engine whose small memory
    budget (about 200 cache positions per request) keeps the requests without max_tokens short and makes others wait."""
    from peftkit.serving.app import create_app
    from peftkit.serving.engine import Engine
    from peftkit.serving.server import start_background
    from peftkit.serving.settings import ServeSettings

    settings = ServeSettings(str(tiny_model_dir), registry=str(registry_dir), dtype="fp32", api_key=KEY, threads=1,
                             kv_cache_mib=0.125, max_loaded_adapters=4)
    engine = Engine(settings).start()
    running = start_background(create_app(engine, settings))
    yield engine, running.url
    running.stop()
    engine.stop()


def test_generated_hostile_requests_get_no_5xx_and_no_hang(fuzzed, tiny_model_dir):
    engine, url = fuzzed
    greedy = chat("lora1", "Hi", max_tokens=8)
    before = engine.generate(greedy, timeout=60).token_ids
    campaign = Campaign(url, TIMEOUT_S, body_limit=1 << 20)  # ServeSettings().max_body_bytes
    try:
        fuzz(campaign, [tiny_model_dir.name if m == "tiny" else m for m in MODELS], REQUESTS, seed=None)  # derandomized
    finally:
        campaign.close()
    growth = campaign.growth()
    failures = [f"{r.method} {r.path} {(r.body or b'')[:300]!r}: {o.server_error}" for r, o in campaign.failures]
    assert failures == []
    assert campaign.sent >= REQUESTS and campaign.slowest < TIMEOUT_S
    assert campaign.statuses[200] >= REQUESTS // 10, campaign.statuses  # a fair share reached the engine and generated
    assert growth < RSS_GROWTH_MIB
    deadline = time.monotonic() + 30  # dropped streams are cancelled at the engine's next step, freeing their slots
    while engine.snapshot()["running_requests"] or engine.snapshot()["queued_requests"] or _in_flight(url):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert engine.ready and engine.generate(greedy, timeout=60).token_ids == before


def _in_flight(url: str) -> float:
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("peftkit_requests_in_flight ")))
