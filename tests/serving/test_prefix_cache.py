"""The prompt-prefix cache: repeated prompt heads are prefilled once, answers do not change, memory stays in budget."""
from __future__ import annotations

import pytest
import torch
from serving_helpers import chat

from peftkit.serving.engine import Engine, GenerationRequest
from peftkit.serving.kinds import VirtualTokens
from peftkit.serving.prefix_cache import PrefixCache
from peftkit.serving.settings import ServeSettings

SYSTEM = "You are the support assistant of a shop that sells boots, tents and stoves. Answer briefly and politely."
QUESTIONS = ["Where is my order?", "Do you sell tents?", "What colour is item 3?", "Can I return boots?"]


def ask(model: str, question: str, max_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(model=model, messages=[{"role": "system", "content": SYSTEM},
                                                    {"role": "user", "content": question}],
                             max_tokens=max_tokens, temperature=0.0)


def heads(length: int) -> VirtualTokens:
    return VirtualTokens("prefix", length, keys=(torch.zeros(1, length, 2),), values=(torch.zeros(1, length, 2),))


def test_a_head_is_kept_once_two_prompts_share_it_and_found_by_the_next():
    cache = PrefixCache(max_bytes=1000, bytes_per_token=10, min_tokens=3)
    first, second, third = [1, 2, 3, 4, 9], [1, 2, 3, 4, 7, 7], [1, 2, 3, 4, 5]
    assert cache.lookup("a", first) is None
    assert cache.worth_keeping("a", first, 0) == 0  # nothing to compare with yet
    assert cache.worth_keeping("a", second, 0) == 4  # the shared head
    assert cache.put("a", second[:4], heads(4), room=1000)
    hit = cache.lookup("a", third)
    assert hit is not None and hit.tokens == 4 and cache.bytes == 40
    assert cache.lookup("b", third) is None  # another adapter's keys and values differ
    assert cache.lookup("a", [1, 2, 3, 4]) is None  # one token must be left to prefill
    assert cache.worth_keeping("a", third, 4) == 0  # it already started from that head


def test_an_adapters_first_prompt_keeps_the_head_it_shares_with_another_adapters_prompt():
    cache = PrefixCache(max_bytes=1000, bytes_per_token=1, min_tokens=3)
    cache.worth_keeping("a", [1, 2, 3, 4, 5], 0)
    assert cache.worth_keeping("b", [1, 2, 3, 4, 9, 9], 0) == 4  # b's own keys and values, kept on its first prompt
    assert cache.worth_keeping("a", [1, 2, 3, 4, 5, 6, 7], 0) == 5  # a's own previous prompt shares more


def test_the_same_prompt_again_keeps_all_but_its_last_token():
    cache = PrefixCache(max_bytes=1000, bytes_per_token=1, min_tokens=3)
    prompt = [5, 6, 7, 8, 9]
    cache.worth_keeping("a", prompt, 0)
    assert cache.worth_keeping("a", prompt, 0) == 4


def test_heads_stay_within_their_bytes_and_the_room_given_least_recently_used_first():
    cache = PrefixCache(max_bytes=90, bytes_per_token=10, min_tokens=1)
    assert cache.put("a", (1, 2, 3), heads(3), room=1000)
    assert cache.put("a", (4, 5, 6), heads(3), room=1000)
    cache.lookup("a", [1, 2, 3, 0])  # (1, 2, 3) is now the most recent
    assert cache.put("a", (7, 8, 9, 9), heads(4), room=1000)  # 30 + 30 + 40 > 90: (4, 5, 6) goes
    assert cache.lookup("a", [4, 5, 6, 0]) is None and cache.lookup("a", [1, 2, 3, 0]) is not None
    assert cache.bytes == 70
    assert not cache.put("a", (1, 1, 1, 1, 1), heads(5), room=40)  # the budget's room is smaller than the head
    cache.shrink(0)
    assert cache.bytes == 0 and len(cache) == 0 and cache.lookup("a", [1, 2, 3, 0]) is None


@pytest.fixture(scope="module")
def uncached(tiny_model_dir, registry_dir):
    eng = Engine(ServeSettings(str(tiny_model_dir), registry=str(registry_dir), dtype="fp32", max_loaded_adapters=8,
                               prefix_cache_mib=0)).start()
    yield eng
    eng.stop()


@pytest.mark.parametrize("model", ["tiny", "lora0", "dora0", "prefix0", "prompt0", "ia3", "bottleneck0"])
def test_requests_starting_from_a_cached_head_answer_as_without_the_cache(engine, uncached, tiny_model_dir, model):
    model = tiny_model_dir.name if model == "tiny" else model
    before = engine.snapshot()
    answers = [engine.generate(ask(model, q), timeout=60).token_ids for q in QUESTIONS]
    after = engine.snapshot()
    assert answers == [uncached.generate(ask(model, q), timeout=60).token_ids for q in QUESTIONS]
    # The first two prompts teach the cache their shared head (template header and system turn); the last two start there.
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] >= 2
    saved = after["prefix_cache_tokens_saved"] - before["prefix_cache_tokens_saved"]
    assert saved >= 2 * len(engine.tokenizer(SYSTEM)["input_ids"])
    assert uncached.snapshot()["prefix_cache_hits"] == 0 and uncached.snapshot()["prefix_cache_entries"] == 0


def test_a_mixed_batch_of_cached_heads_answers_as_each_request_alone_without_the_cache(engine, uncached):
    models = ["lora1", "lora2", "prefix0", "lora1", "prompt0"]
    for m in set(models):  # teach the cache each adapter's head
        for q in QUESTIONS[:2]:
            engine.generate(ask(m, q), timeout=60)
    hits = engine.snapshot()["prefix_cache_hits"]
    requests = [ask(m, q) for m, q in zip(models, ["Hi", "Where are the tents?", "Stoves?", "Boots in size 44?", "Hello"])]
    together = [h.result(60).token_ids for h in engine.submit_batch(requests)]
    assert engine.snapshot()["prefix_cache_hits"] - hits == len(requests)
    assert together == [uncached.generate(r, timeout=60).token_ids for r in requests]


def test_cached_heads_give_way_to_requests_within_the_memory_budget(tiny_model_dir, registry_dir):
    from peftkit.serving.memory import MIB

    eng = Engine(ServeSettings(str(tiny_model_dir), registry=str(registry_dir), dtype="fp32",
                               kv_cache_mib=0.2, prefix_cache_mib=0.2)).start()
    try:
        for q in QUESTIONS:
            eng.generate(ask("lora3", q), timeout=60)
        kept = eng.snapshot()["prefix_cache_bytes"]
        assert 0 < kept <= 0.2 * MIB
        # Without max_tokens a request may fill all the budget its adapter leaves: it runs, and the heads make room
        # for it, so the budget is never exceeded.
        assert eng.context_length * eng.memory.per_token > eng.memory.total
        done = eng.generate(chat("lora3", "Hi", max_tokens=None), timeout=120)
        assert done.finish_reason in ("length", "stop")
        assert eng.snapshot()["prefix_cache_bytes"] < kept
    finally:
        eng.stop()


def test_the_prefix_cache_can_be_turned_off_and_is_off_in_batch_invariant_mode(tiny_model_dir, registry_dir):
    from peftkit.serving.memory import Budget
    from peftkit.serving.scheduler import prefix_cache_bytes

    budget = Budget(8 * (1 << 20), 100)
    assert prefix_cache_bytes(ServeSettings(), budget) == (1 << 20)
    assert prefix_cache_bytes(ServeSettings(prefix_cache_mib=2), budget) == 2 * (1 << 20)
    assert prefix_cache_bytes(ServeSettings(prefix_cache_mib=2, batch_invariant=True), budget) == 0
