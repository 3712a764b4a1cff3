"""The serving engine's batched LoRA forward: mixed ranks, scalings and targets give peft's own logits, in fp32 and
bf16, across loads and evictions, and through the engine."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serving_helpers import chat, make_adapter

from peftkit.serving.adapters import BASE, Profile
from peftkit.serving.loaded import MIXED, LoadedAdapters

# name -> LoRA config: ranks 4, 16 and 8, scalings alpha/r and rsLoRA's alpha/sqrt(r), and different target modules.
ADAPTERS = {
    "r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
    "r16-rslora": dict(r=16, lora_alpha=16, use_rslora=True,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "r8-mlp": dict(r=8, lora_alpha=32, target_modules=["up_proj", "down_proj"]),
    "r2-embed": dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]),  # peft runs its embedding LoRA
    "r4-bias": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True),  # peft runs all of it
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
}
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17, 18, 19], [20], [21, 22, 23, 24, 25]]


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Return {name: adapter folder} of ADAPTERS, with random non-zero weights."""
    root = tmp_path_factory.mktemp("batched-lora")
    return {name: make_adapter(tiny_model_dir, root / name, seed=50 + i, **config)
            for i, (name, config) in enumerate(ADAPTERS.items())}


def profile(name: str, folder: Path) -> Profile:
    kind = "dora" if name == "dora" else "lora"
    return Profile(name, f"{name}@1", f"ad_{name}", folder, "lora", kind, kind == "lora", None, None, frozenset())


def loaded_adapters(tiny_model_dir, folders, names: list[str], dtype: str = "fp32", capacity: int = 8):
    """Return LoadedAdapters on the tiny base with these adapters loaded (and pinned)."""
    from peftkit.models import load_base

    loaded = LoadedAdapters(capacity, dtype=dtype, device="cpu")
    loaded.attach(load_base(str(tiny_model_dir), dtype=dtype, device="cpu").eval())
    for name in names:
        assert loaded.cache.acquire(profile(name, folders[name]))
    return loaded


def batch(rows: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Return left-padded input ids, their mask and peft's per-row names for rows of these adapters (None: base)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(rows))]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, [BASE if r is None else f"ad_{r}" for r in rows]


def both_logits(loaded: LoadedAdapters, rows: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (batched, peft's adapter_names) logits at every position of a padded batch of these rows."""
    ids, mask, names = batch(rows)
    with torch.inference_mode():
        assert loaded.batched.covers(names)
        ours = loaded.batched.run(loaded.peft, names, input_ids=ids, attention_mask=mask).logits
        theirs = loaded.peft(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    return ours.float(), theirs.float()


MIX = [None, "r4", "r16-rslora", None, "r8-mlp", "r4", "r2-embed", "r16-rslora"]


def test_batched_forward_equals_peft_for_mixed_ranks_scalings_and_targets(tiny_model_dir, folders):
    loaded = loaded_adapters(tiny_model_dir, folders, ["r4", "r16-rslora", "r8-mlp", "r2-embed", "dora"])
    ours, theirs = both_logits(loaded, MIX)
    mask = batch(MIX)[1].bool()
    assert torch.allclose(ours[mask], theirs[mask], atol=1e-5, rtol=1e-5)
    # Every adapter changes its rows (else equality would prove nothing), and the two base rows are the base.
    last = theirs[:, -1]
    assert all((last[i] - last[0]).abs().max() > 1e-2 for i, r in enumerate(MIX) if r is not None)
    with torch.inference_mode():
        base = loaded.model(input_ids=batch(MIX)[0], attention_mask=batch(MIX)[1]).logits
    assert torch.allclose(ours[3][mask[3]], base[3][mask[3]], atol=1e-5)


def test_batched_forward_in_bf16_is_close_and_picks_the_same_tokens(tiny_model_dir, folders):
    # Not r2-embed: peft 0.21.2 itself fails on it in bf16 (it upcasts the tied embedding's base weight to fp32).
    rows = [r if r != "r2-embed" else "r4" for r in MIX]
    loaded = loaded_adapters(tiny_model_dir, folders, ["r4", "r16-rslora", "r8-mlp"], dtype="bf16")
    ours, theirs = both_logits(loaded, rows)
    assert ours.dtype == theirs.dtype == torch.float32
    assert (ours[:, -1] - theirs[:, -1]).abs().max() < 0.05 * theirs[:, -1].abs().max()  # bf16 stacks, fp32 in peft
    assert ours[:, -1].argmax(-1).tolist() == theirs[:, -1].argmax(-1).tolist()


def test_slots_follow_loads_and_evictions(tiny_model_dir, folders):
    loaded = loaded_adapters(tiny_model_dir, folders, ["r4", "r16-rslora", "r8-mlp"], capacity=3)
    loaded.cache.release("ad_r16-rslora")
    assert loaded.cache.acquire(profile("r2-embed", folders["r2-embed"]))  # evicts r16-rslora, the only unpinned one
    assert loaded.cache.loaded() == ["ad_r4", "ad_r8-mlp", "ad_r2-embed"]
    assert "ad_r16-rslora" not in loaded.batched.batchable
    rows = ["r2-embed", "r8-mlp", None, "r4", "r2-embed"]
    ours, theirs = both_logits(loaded, rows)
    mask = batch(rows)[1].bool()
    assert torch.allclose(ours[mask], theirs[mask], atol=1e-5, rtol=1e-5)
    # The layers that held only the evicted adapter (k_proj, gate_proj) hold nothing now.
    stacks = {name: loaded.batched.stacks.get(module) for name, module in loaded.peft.named_modules()}
    assert stacks["base_model.model.model.layers.0.self_attn.k_proj"] is None
    assert stacks["base_model.model.model.layers.0.self_attn.q_proj"].keys == ("ad_r4", "ad_r2-embed")


def test_the_mixed_lane_runs_without_peft_s_per_adapter_loop(tiny_model_dir, folders, monkeypatch):
    from peft.tuners.lora import Linear
    from transformers import DynamicCache

    loaded = loaded_adapters(tiny_model_dir, folders, ["r4", "r16-rslora", "r8-mlp", "r4-bias"])
    ids, mask, names = batch([None, "r4", "r16-rslora", "r8-mlp"])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        expected = loaded.peft(input_ids=ids, attention_mask=mask, position_ids=positions, adapter_names=names).logits
        monkeypatch.setattr(Linear, "_mixed_batch_forward", lambda *a, **k: pytest.fail("peft's loop ran"))
        got = loaded.forward_for(MIXED)(ids, mask, positions, DynamicCache(), names, None)
        assert torch.allclose(got, expected[:, -1], atol=1e-5, rtol=1e-5)
        monkeypatch.undo()
        # An adapter with a LoRA bias is not stacked: its rows take peft's path, which still gives its logits.
        ids, mask, names = batch(["r4-bias", "r4"])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        assert not loaded.batched.covers(names)
        expected = loaded.peft(input_ids=ids, attention_mask=mask, position_ids=positions, adapter_names=names).logits
        got = loaded.forward_for(MIXED)(ids, mask, positions, DynamicCache(), names, None)
        assert torch.allclose(got, expected[:, -1], atol=1e-6)


def test_engine_mixed_ranks_batch_equals_each_request_run_alone(tiny_model_dir, folders, tmp_path):
    from peftkit.registry import Registry
    from peftkit.serving.engine import Engine
    from peftkit.serving.settings import ServeSettings

    registry = Registry(tmp_path / "registry")
    for name in ("r4", "r16-rslora", "r8-mlp", "r2-embed"):
        registry.add(folders[name], name=name, base_model_dir=tiny_model_dir)
    registry.close()
    eng = Engine(ServeSettings(str(tiny_model_dir), registry=str(tmp_path / "registry"), dtype="fp32")).start()
    try:
        models = [tiny_model_dir.name, "r4", "r16-rslora", "r8-mlp", "r2-embed", "r4"]
        texts = ["Hi", "Where is my order?", "Tell me about boots.", "Hello there", "Thanks!", "Can I pay by card?"]
        requests = [chat(m, t, max_tokens=8) for m, t in zip(models, texts)]
        singles = [eng.generate(r, timeout=120).token_ids for r in requests]
        eng.batch_sizes.clear()
        together = [h.result(120).token_ids for h in eng.submit_batch(requests)]
        assert together == singles
        assert max(eng.batch_sizes) == len(requests)
        assert len({tuple(t) for t in singles}) == len(singles)
    finally:
        eng.stop()


def test_a_failed_batched_forward_leaves_peft_s_own_forward_intact(tiny_model_dir, folders):
    loaded = loaded_adapters(tiny_model_dir, folders, ["r4", "r16-rslora"])
    ids, mask, names = batch(["r4", "r16-rslora"])
    with torch.inference_mode():
        swapped = names[::-1]  # a forward after the failure must not run the failed one's rows
        expected = loaded.peft(input_ids=ids, attention_mask=mask, adapter_names=swapped).logits
        def fail(*_):
            raise RuntimeError("out of memory")
        layer = loaded.peft.base_model.model.model.layers[1]  # fails after layer 0's LoRA layers ran batched
        hook = layer.register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="out of memory"):
            loaded.batched.run(loaded.peft, names, input_ids=ids, attention_mask=mask)
        hook.remove()
        assert torch.equal(loaded.peft(input_ids=ids, attention_mask=mask, adapter_names=swapped).logits, expected)
        ours = loaded.batched.run(loaded.peft, swapped, input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5)


def test_the_stacks_count_against_the_memory_budget(tiny_model_dir, folders):
    """An adapter's recorded size includes its copy in the stacks, so the budget sees what the server really holds."""
    loaded = loaded_adapters(tiny_model_dir, folders, ["r4"])
    params = sum(p.numel() * p.element_size() for n, p in loaded.peft.named_parameters() if ".ad_r4." in n)
    assert loaded.batched.nbytes() > 0
    assert loaded.cache.sizes["ad_r4"] == params + loaded.batched.nbytes()
