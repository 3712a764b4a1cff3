"""Every serving consumer agrees with the method catalog: what is served, how each method runs, what vLLM takes."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from serving_helpers import chat

from peftkit.methods.catalog import CATALOG, DORA, LORA, METHOD_NAMES, MODEL, VIRTUAL, method_names

# One adapter in the test registry per method (qlora has none: its 4-bit base needs bitsandbytes on a GPU;
# its adapters are plain peft LoRA adapters, served exactly as lora's).
ADAPTER_OF = {"lora": "lora0", "dora": "dora0", "prefix": "prefix0", "prompt": "prompt0", "ia3": "ia3",
              "bottleneck": "bottleneck0", "full": "full0"}


def test_the_server_runs_every_method_the_catalog_holds():
    from peftkit.serving.adapters import SERVED_METHODS

    assert sorted(SERVED_METHODS) == sorted(METHOD_NAMES)
    assert set(ADAPTER_OF) == {m.name for m in CATALOG.values() if not m.quantized_base}


@pytest.mark.parametrize("method", sorted(ADAPTER_OF))
def test_each_method_runs_as_its_catalog_kind(engine, method):
    record, name = CATALOG[method], ADAPTER_OF[method]
    profile = engine.resolver.resolve(name)
    assert (profile.method, profile.kind, profile.mixable) == (method, record.serve_kind, record.mixes)
    engine.generate(chat(name, max_tokens=1), timeout=120)
    loaded = engine.adapters
    # The loaded adapter sits where its kind is kept: virtual tokens, its own model, or the shared PeftModel.
    assert (profile.key in loaded.virtual) == (record.serve_kind == VIRTUAL)
    assert (profile.key in loaded.models) == (record.serve_kind == MODEL)
    assert (loaded.peft is not None and profile.key in loaded.peft.peft_config) == (record.serve_kind not in (VIRTUAL, MODEL))


def test_vllm_serves_exactly_the_catalogs_vllm_methods(tmp_path):
    from peftkit.serving.vllm import LORA_METHODS, build_vllm_launch

    assert LORA_METHODS == method_names(vllm=True)
    entries = []
    for i, record in enumerate(CATALOG.values()):  # one registry entry per method, its adapter_config as saved
        folder = tmp_path / record.name
        folder.mkdir()
        config = {"peft_type": (record.peft_types or ("",))[0], "r": 8, "use_dora": record.serve_kind == DORA}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        entries.append(SimpleNamespace(name=record.name, version=1, tags=[], ref=f"{record.name}@1", method=record.name,
                                       base_fingerprint=None, base_model=None, rank=8, folder=folder))
    registry = SimpleNamespace(list=lambda: entries, checkout=lambda ref: next(e.folder for e in entries if e.ref == ref))
    plan = build_vllm_launch(registry, "base", "base")
    assert {ref.split("@")[0] for ref, _ in plan.served} == set(method_names(vllm=True))
    rejected = dict(plan.rejected)
    assert "DoRA" in rejected["dora@1"]  # a LoRA-family method gets the detailed reason
    assert all("LoRA adapters only" in rejected[f"{m.name}@1"] for m in CATALOG.values() if "LORA" not in m.peft_types)


def test_load_bench_every_method_scenario_covers_every_other_kind():
    from peftkit.bench.serve_load import OTHER_METHODS

    assert sorted(OTHER_METHODS) == sorted(["prefix", "prompt", "dora", "ia3", "bottleneck", "full"])
    assert {CATALOG[m].serve_kind for m in OTHER_METHODS} | {LORA} == {m.serve_kind for m in CATALOG.values()}


def test_prefix_table_reads_back_the_keys_and_values_it_was_written_from():
    import torch

    from peftkit.methods.prompt import prefix_table, split_prefix_table

    layers, heads, n, dim = 3, 2, 5, 4
    keys, values = torch.randn(layers, heads, n, dim), torch.randn(layers, heads, n, dim)
    config = {"num_layers": layers, "num_attention_heads": heads, "token_dim": heads * dim}
    read_keys, read_values = split_prefix_table(prefix_table(keys, values), config)
    assert len(read_keys) == len(read_values) == layers
    assert all(torch.equal(read_keys[i], keys[i]) and torch.equal(read_values[i], values[i]) for i in range(layers))


def test_virtual_tokens_take_the_first_positions_and_every_prompt_token_sees_them():
    from peftkit.methods.prompt import virtual_prefill

    mask, positions, pads = virtual_prefill([2, 4], 3, in_cache=True)  # prefix: cache columns before the padding
    assert pads == [2, 0]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1]]
    assert positions.tolist() == [[2, 2, 3, 4], [3, 4, 5, 6]]  # the prompt starts at 3; padding never attended
    mask, positions, _ = virtual_prefill([2, 4], 3, in_cache=False)  # prompt: embeddings after the padding
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]
    assert positions.tolist() == [[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]
