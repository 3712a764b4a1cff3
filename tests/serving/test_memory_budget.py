"""Requests are admitted against a KV-cache memory budget; whole-model adapters count by their real weights."""
from __future__ import annotations

import pytest
from serving_helpers import chat

from peftkit.serving.engine import Engine
from peftkit.serving.errors import MemoryBudgetError
from peftkit.serving.memory import MIB
from peftkit.serving.settings import ServeSettings

PER_TOKEN = 2 * 2 * 16 * 2 * 4  # the tiny Llama: layers x kv heads x head dim x (keys, values) x fp32 bytes


@pytest.fixture
def budget_engine(tiny_model_dir, registry_dir):
    """Return make(mib, **settings) -> a started engine with that memory budget (stopped after the test)."""
    engines = []

    def make(mib: float, **settings) -> Engine:
        engines.append(Engine(ServeSettings(str(tiny_model_dir), registry=str(registry_dir), dtype="fp32",
                                            kv_cache_mib=mib, **settings)).start())
        return engines[-1]
    yield make
    for eng in engines:
        eng.stop()


def test_the_budget_is_derived_from_the_models_shape_and_free_memory(engine):
    snap = engine.snapshot()
    assert snap["kv_cache_bytes_per_token"] == PER_TOKEN
    assert snap["kv_cache_budget_bytes"] > 1 * MIB  # half of the memory free after loading, by default


def test_a_request_that_can_never_fit_is_refused_naming_the_limit(budget_engine, server_for):
    eng = budget_engine(0.25)
    adapter = eng.resolver.resolve("lora1").weight_bytes
    prompt = eng.submit(chat("lora1", max_tokens=1)).prompt_tokens
    room = (int(0.25 * MIB) - adapter) // PER_TOKEN - prompt
    with pytest.raises(MemoryBudgetError, match=f"memory budget of 0.25 MiB .*reduce max_tokens to at most {room}") as info:
        eng.submit(chat("lora1", max_tokens=room + 1))
    assert info.value.param == "max_tokens"
    reply = server_for(eng).post("/v1/chat/completions", json={"model": "lora1", "max_tokens": room + 1,
                                                              "messages": [{"role": "user", "content": "What colour is item 3?"}]})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "kv_cache_budget_exceeded"
    assert eng.generate(chat("lora1", max_tokens=room), timeout=60).completion_tokens <= room
    # Without max_tokens a request may fill what the budget leaves it, not the whole context.
    assert eng.generate(chat("lora1", max_tokens=None), timeout=60).completion_tokens <= room


def test_requests_that_fit_later_wait_for_memory_instead_of_failing(budget_engine, engine, tiny_model_dir):
    base = tiny_model_dir.name
    requests = [chat(base, "Tell me a long story about boots.", max_tokens=200), chat(base, "Hi", max_tokens=200)]
    expected = [engine.generate(r, timeout=60).token_ids for r in requests]
    eng = budget_engine(0.2)  # 409 cache positions: each request alone fits, both together do not
    handles = eng.submit_batch(requests)
    assert [h.result(60).token_ids for h in handles] == expected
    assert max(eng.batch_sizes) == 1  # the second was admitted only once the first had finished


def test_a_full_fine_tune_counts_its_whole_weights_and_is_evicted_to_make_room(budget_engine, server_for, registry_dir):
    from transformers import LlamaForCausalLM

    from peftkit.registry import Registry

    model = LlamaForCausalLM.from_pretrained(Registry(registry_dir).checkout("full0"))
    weights = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values())
    eng = budget_engine((weights + 100_000) / MIB)  # the full fine-tune and about 195 cache positions
    with pytest.raises(MemoryBudgetError, match=r"MiB of adapter full0@1's weights"):
        eng.submit(chat("full0", max_tokens=300))
    assert eng.generate(chat("full0", max_tokens=20), timeout=60).completion_tokens <= 20
    snap = eng.snapshot()
    assert snap["adapter_weight_bytes"] == weights > 10 * MIB  # a whole model, not one cache slot
    assert eng.generate(chat(eng.served_name, max_tokens=300), timeout=60)  # needs the full's room
    snap = eng.snapshot()
    assert (snap["adapter_cache_evictions"], snap["adapter_weight_bytes"]) == (1, 0)
    lines = dict(line.split(" ", 1) for line in server_for(eng).get("/metrics").text.splitlines() if line[0] != "#")
    assert float(lines["peftkit_kv_cache_budget_bytes"]) == eng.memory.total == int(weights + 100_000)
    assert float(lines["peftkit_adapter_weight_bytes"]) == 0 == float(lines["peftkit_kv_cache_reserved_bytes"])
