"""The engine: mixed batches equal single runs, rows join and leave, the adapter LRU, stops, limits, cancellation."""
from __future__ import annotations

import time

import pytest
from serving_helpers import chat

from peftkit.serving.engine import Engine, GenerationRequest
from peftkit.serving.errors import ContextLengthError, UnknownModelError, UnsupportedAdapterError
from peftkit.serving.settings import ServeSettings

# Prompts of different lengths, so rows really are left-padded against each other.
MIX = [("lora0", "Hi"), ("lora2", "What colour is item 3? Please answer in one short sentence."),
       ("lora3", "Where is my order?"), ("tiny", "Tell me about the return policy for shoes and boots."),
       ("dora0", "Hello there")]


def alone(engine, request) -> list[int]:
    return engine.generate(request, timeout=60).token_ids


def test_mixed_batch_equals_each_request_run_alone(engine, tiny_model_dir):
    base = tiny_model_dir.name
    requests = [chat(base if m == "tiny" else m, text, max_tokens=10) for m, text in MIX]
    singles = [alone(engine, r) for r in requests]
    engine.batch_sizes.clear()
    together = [h.result(60).token_ids for h in engine.submit_batch(requests)]
    assert together == singles
    # Three LoRA adapters and the base shared forwards (DoRA runs in its own lane), and they really differ.
    assert max(engine.batch_sizes) >= 4
    assert len({tuple(t) for t in singles}) == len(singles)


def test_rows_joining_a_running_batch_match_single_runs(engine):
    first = chat("lora4", "Tell me a long story about boots.", max_tokens=24)
    late = [chat("lora5", "Hi", max_tokens=12), chat("lora0:stable", "Where is my parcel today?", max_tokens=12)]
    expected = [alone(engine, r) for r in [first, *late]]
    handle = engine.submit(first)
    while len(handle.token_ids) < 6:  # join while the first row is several tokens in
        time.sleep(0.005)
    handles = [handle, *engine.submit_batch(late)]
    assert [h.result(60).token_ids for h in handles] == expected


def test_greedy_output_equals_peft_generate(engine, registry_dir, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from peftkit.data import build_prompt_ids
    from peftkit.registry import Registry

    done = engine.generate(chat("lora6", max_tokens=12))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = build_prompt_ids(tok, [{"role": "user", "content": "What colour is item 3?"}])
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model_dir), Registry(registry_dir).checkout("lora6"))
    with torch.no_grad():
        # An explicit mask: the prompt holds <|im_end|>, which this raw tokenizer also uses as its pad token.
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert done.prompt_tokens == len(ids)
    assert out[0, len(ids):].tolist()[: len(done.token_ids)] == done.token_ids


def test_seeded_sampling_does_not_depend_on_batch_mates(engine):
    request = chat("lora1", max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    single = alone(engine, request)
    handles = engine.submit_batch([chat("lora2", max_tokens=10, temperature=1.0, seed=1), request, chat("lora3", max_tokens=10)])
    assert handles[1].result(60).token_ids == single
    assert alone(engine, chat("lora1", max_tokens=10, temperature=0.9, top_p=0.9, seed=8)) != single


def test_adapter_cache_is_lru_keyed_by_content(tiny_model_dir, registry_dir):
    eng = Engine(ServeSettings(str(tiny_model_dir), registry=str(registry_dir), dtype="fp32", max_loaded_adapters=2)).start()
    try:
        for model in ("lora1", "lora2", "lora1", "lora3", "lora0@2"):  # lora0@2 holds lora1's files
            eng.generate(chat(model, max_tokens=2))
        snap = eng.snapshot()
        assert (snap["adapter_cache_misses"], snap["adapter_cache_hits"], snap["adapter_cache_evictions"]) == (3, 2, 1)
        assert snap["adapters_loaded"] == 2
        assert set(eng.adapters.peft.peft_config) == set(eng.adapters.cache.loaded())
    finally:
        eng.stop()


def test_adapter_of_a_request_in_flight_is_never_evicted(tiny_model_dir, registry_dir):
    eng = Engine(ServeSettings(str(tiny_model_dir), registry=str(registry_dir), dtype="fp32", max_loaded_adapters=1)).start()
    try:
        long = chat("lora7", "Tell me a long story.", max_tokens=20)
        expected = [alone(eng, long), alone(eng, chat("lora8"))]
        first = eng.submit(long)
        while not first.token_ids:
            time.sleep(0.005)
        second = eng.submit(chat("lora8"))
        assert first.result(60).token_ids == expected[0]  # lora7 stayed loaded through its whole request
        assert second.result(60).token_ids == expected[1]
        assert eng.snapshot()["adapter_cache_evictions"] >= 1
    finally:
        eng.stop()


def test_stop_string_cuts_the_text_and_reports_stop(engine):
    full = engine.generate(chat("lora2", max_tokens=12))
    cut = full.text[len(full.text) // 2:][:3]
    done = engine.generate(chat("lora2", max_tokens=12, stop=[cut]))
    assert done.finish_reason == "stop"
    assert done.text == full.text[: full.text.index(cut)]


def test_prompt_and_max_tokens_are_checked_against_the_context(engine):
    with pytest.raises(ContextLengthError) as info:
        engine.submit(chat("lora0", max_tokens=engine.context_length))
    assert info.value.param == "max_tokens" and f"{engine.context_length} tokens" in str(info.value)
    with pytest.raises(ContextLengthError) as info:
        engine.submit(GenerationRequest(model="lora0", prompt=[5] * engine.context_length, max_tokens=1))
    assert info.value.param == "prompt"


def test_model_names_resolve_only_through_the_registry(engine, adapter_dirs):
    for name in (str(adapter_dirs["lora0"]), "../lora0", "lora0/../lora1", "lora0@9", "nope:stable"):
        with pytest.raises(UnknownModelError):
            engine.submit(chat(name))


def test_adapter_for_another_base_is_refused(tmp_path, adapter_dirs, engine):
    import torch
    from transformers import LlamaForCausalLM

    from peftkit.registry import Registry

    other = tmp_path / "other-base"
    model = LlamaForCausalLM.from_pretrained(engine.settings.base)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # same shapes, other weights: another fingerprint
    model.save_pretrained(other)
    registry = Registry(engine.settings.registry)
    registry.add(adapter_dirs["lora8"], name="elsewhere", base_model_dir=other)
    with pytest.raises(UnsupportedAdapterError, match="trained on base"):
        engine.submit(chat("elsewhere"))
    assert "elsewhere" not in {m["id"] for m in engine.list_models()}
    registry.remove("elsewhere")


def test_cancel_stops_generation(engine):
    handle = engine.submit(chat("lora3", max_tokens=400))
    while not handle.token_ids:
        time.sleep(0.005)
    handle.cancel()
    last = list(handle.events(60))[-1]
    assert last.finish_reason == "cancelled" and last.completion_tokens < 400
    assert engine.snapshot()["running_requests"] == 0


def test_a_failed_forward_fails_its_requests_not_the_server(engine, monkeypatch):
    from peftkit.serving import batcher
    from peftkit.serving.errors import GenerationFailedError

    real_add, calls = batcher.Lane.add, []

    def add_failing_once(self, rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real_add(self, rows)

    monkeypatch.setattr(batcher.Lane, "add", add_failing_once)
    with pytest.raises(GenerationFailedError, match="out of memory"):
        engine.generate(chat("lora1"), timeout=60)
    assert engine.generate(chat("lora1"), timeout=60).completion_tokens == 8
    assert engine.snapshot()["running_requests"] == 0 and engine.ready


TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}### assistant:\n{% endif %}")


def test_prompts_and_stops_follow_the_adapters_training_settings(engine, adapter_dirs, tmp_path, tokenizer):
    import json
    import shutil

    from peftkit.data import build_prompt_ids, stop_token_ids
    from peftkit.registry import Registry

    folder = tmp_path / "trained"
    shutil.copytree(adapter_dirs["lora5"], folder)
    data = {"system_prompt": "You are Fernhill Support.", "chat_template": TEMPLATE}
    (folder / "peftkit.json").write_text(json.dumps({"method": "lora", "config": {"data": data}}))
    Registry(engine.settings.registry).add(folder, name="templated", base_model_dir=engine.settings.base)
    messages = [{"role": "user", "content": "Where is my order?"}]
    handle = engine.submit(GenerationRequest(model="templated", messages=messages, max_tokens=2, temperature=0))
    expected = build_prompt_ids(tokenizer, messages, system_prompt=data["system_prompt"], chat_template=TEMPLATE)
    assert handle.prompt_tokens == len(expected) != engine.submit(chat("lora5")).prompt_tokens
    assert handle.profile.stop_ids == frozenset(stop_token_ids(tokenizer, chat_template=TEMPLATE))
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in handle.profile.stop_ids
    handle.result(60)


def test_a_prefill_budget_spreads_joining_requests_over_steps_without_changing_answers(tiny_model_dir, registry_dir,
                                                                                      monkeypatch):
    """With max_prefill_tokens below two prompts, requests arriving together join one per step, each after the rows
    already decoding got a token, and every answer is the one it gets alone."""
    from peftkit.serving.batcher import Lane

    requests = [chat("lora0", "Hi", max_tokens=8), chat("lora2", "Where is my order?", max_tokens=8),
                chat("lora3", "Hello there", max_tokens=8)]
    eng = Engine(ServeSettings(str(tiny_model_dir), registry=str(registry_dir), dtype="fp32", threads=1,
                               max_prefill_tokens=1)).start()
    try:
        expected = [alone(eng, r) for r in requests]
        joins, add = [], Lane.add

        def recording_add(lane, rows):
            joins.append((len(rows), [len(r.output_ids) for r in lane.rows]))
            return add(lane, rows)

        monkeypatch.setattr(Lane, "add", recording_add)
        assert [h.result(60).token_ids for h in eng.submit_batch(requests)] == expected
    finally:
        eng.stop()
    assert [n for n, _ in joins] == [1, 1, 1]  # one row per step, not all three at once
    assert all(len(decoding) == i and min(decoding, default=2) >= 2 for i, (_, decoding) in enumerate(joins))
