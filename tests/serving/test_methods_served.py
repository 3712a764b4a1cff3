"""Every peftkit method is served: prefix/prompt rows share forwards with LoRA rows, IA3/bottleneck/full run in lanes
of their own, and every output equals the method's own generate run alone."""
from __future__ import annotations

import pytest
import torch
from serving_helpers import chat

from peftkit.serving.engine import Engine
from peftkit.serving.settings import ServeSettings

OTHERS = ["prefix0", "prefix-mlp", "prompt0", "ia3", "bottleneck0", "full0"]
QUESTION = "What colour is item 3?"


def reference_tokens(tiny_model_dir, registry_dir, name: str | None, max_tokens: int) -> list[int]:
    """Return greedy tokens from transformers' generate on the base with peftkit's own loader for the adapter."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from peftkit.data import build_prompt_ids
    from peftkit.methods import load_adapter
    from peftkit.registry import Registry

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = build_prompt_ids(tok, [{"role": "user", "content": QUESTION}])
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    if name is not None:
        model = load_adapter(model, Registry(registry_dir).checkout(name))
    with torch.no_grad():
        out = model.eval().generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                                    pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", OTHERS)
def test_each_method_served_equals_its_own_generate(engine, tiny_model_dir, registry_dir, name):
    done = engine.generate(chat(name, QUESTION, max_tokens=10), timeout=120)
    expected = reference_tokens(tiny_model_dir, registry_dir, name, 10)
    assert done.token_ids and expected[: len(done.token_ids)] == done.token_ids
    # The adapter really changes the output (else equality above would prove nothing about it).
    assert reference_tokens(tiny_model_dir, registry_dir, None, 10) != expected


def test_mixed_batch_of_every_method_equals_each_request_run_alone(engine, tiny_model_dir):
    base = tiny_model_dir.name
    texts = ["Hi", "Where is my order?", "Tell me about the return policy for shoes and boots.", "Hello there",
             "What colour is item 3? Please answer in one short sentence.", "Do you ship abroad?", "Thanks!",
             "Can I pay by card?", "Is the tent waterproof?"]
    models = [base, "lora0", "dora0", *OTHERS]
    requests = [chat(m, t, max_tokens=8) for m, t in zip(models, texts)]
    singles = [engine.generate(r, timeout=120).token_ids for r in requests]
    engine.batch_sizes.clear()
    together = [h.result(120).token_ids for h in engine.submit_batch(requests)]
    assert together == singles
    assert len({tuple(t) for t in singles}) == len(singles)  # nine different models, nine different answers
    # Base, LoRA and the three prefix/prompt rows decoded in one forward; DoRA, IA3, bottleneck, full alone.
    assert max(engine.batch_sizes) == 5


def test_base_weights_are_untouched_by_adapters_that_change_layers(engine, tiny_model_dir, registry_dir):
    before = {n: p.clone() for n, p in engine.model.named_parameters()}
    for name in ("ia3", "bottleneck0", "full0", "lora3"):
        engine.generate(chat(name, QUESTION, max_tokens=4), timeout=120)
    assert engine.generate(chat(tiny_model_dir.name, QUESTION, max_tokens=10)).token_ids == \
        reference_tokens(tiny_model_dir, registry_dir, None, 10)[: 10]
    after = dict(engine.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    # IA3 and bottleneck run on a module tree that holds the base's very tensors, not copies of them.
    base_storage = {p.data_ptr() for p in engine.model.parameters()}
    for name in ("ia3", "bottleneck0"):
        own = engine.adapters.models[engine.resolver.resolve(name).key]
        weights = [p for n, p in own.named_parameters() if "ia3_" not in n and not n.startswith("layers.")]
        assert len(weights) == len(before) - sum("lora_" in n for n in before)
        assert all(p.data_ptr() in base_storage for p in weights)


def test_every_kind_is_evicted_and_reloaded_within_the_cache(tiny_model_dir, registry_dir, engine):
    expected = {n: engine.generate(chat(n, max_tokens=6), timeout=120).token_ids for n in OTHERS}
    small = Engine(ServeSettings(str(tiny_model_dir), registry=str(registry_dir), dtype="fp32", max_loaded_adapters=2)).start()
    try:
        for name in [*OTHERS, *reversed(OTHERS)]:
            assert small.generate(chat(name, max_tokens=6), timeout=120).token_ids == expected[name]
            assert len(small.adapters.cache.loaded()) <= 2
            assert len(small.adapters.models) + len(small.adapters.virtual) == len(small.adapters.cache.loaded())
        # Two slots: the turn-around finds the last two loaded; every other request loads and evicts.
        cache = small.adapters.cache
        assert (cache.misses, cache.hits, cache.evictions) == (10, 2, 8)
    finally:
        small.stop()
