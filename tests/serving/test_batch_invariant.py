"""--batch-invariant: a request's logits, bit for bit, do not depend on its batch-mates or padding, in fp32 and bf16."""
from __future__ import annotations

import pytest
import torch
from serving_helpers import chat, make_adapter

from peftkit.serving.adapters import BASE, Profile
from peftkit.serving.batcher import Lane, Row, SoloLane
from peftkit.serving.engine import Engine, GenerationRequest
from peftkit.serving.loaded import MIXED, LoadedAdapters
from peftkit.serving.settings import ServeSettings

# (adapter or None for the base, prompt): prompts of different lengths, so a shared batch would pad them.
ROWS = [(None, [5, 6, 7, 8, 9, 10, 11]), ("r4", [12, 13]), ("r8", [14, 15, 16, 17]), ("r4", [18, 19, 20, 21, 22, 23])]
STEPS = 5


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("invariant")
    return {"r4": make_adapter(tiny_model_dir, root / "r4", seed=7, r=4, lora_alpha=8),
            "r8": make_adapter(tiny_model_dir, root / "r8", seed=8, r=8, lora_alpha=8,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])}


def loaded(tiny_model_dir, folders, dtype: str) -> LoadedAdapters:
    from peftkit.models import load_base

    adapters = LoadedAdapters(4, dtype=dtype, device="cpu")
    adapters.attach(load_base(str(tiny_model_dir), dtype=dtype, device="cpu").eval())
    for name, folder in folders.items():
        assert adapters.cache.acquire(Profile(name, f"{name}@1", f"ad_{name}", folder, "lora", "lora", True, None, None,
                                              frozenset()))
    return adapters


def rows() -> list[Row]:
    return [Row(prompt, BASE if a is None else f"ad_{a}", BASE if a is None else f"ad_{a}", 64, frozenset())
            for a, prompt in ROWS]


def run(lane: Lane, batches: list[list[Row]]) -> dict[int, list[torch.Tensor]]:
    """Return each row's logits at prefill and at every decode step; batches join one step apart."""
    seen: dict[int, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for joining in batches:
            for row, logits in zip(joining, lane.add(joining)):
                seen[id(row)] = [logits]
                row.output_ids.append(int(logits.argmax()))
            if lane.rows:
                for row, logits in zip(lane.rows, lane.step([r.output_ids[-1] for r in lane.rows])):
                    seen[id(row)].append(logits)
                    row.output_ids.append(int(logits.argmax()))
        for _ in range(STEPS):
            for row, logits in zip(lane.rows, lane.step([r.output_ids[-1] for r in lane.rows])):
                seen[id(row)].append(logits)
                row.output_ids.append(int(logits.argmax()))
    return seen


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_each_row_gets_bit_for_bit_the_logits_it_gets_alone(tiny_model_dir, folders, dtype):
    adapters = loaded(tiny_model_dir, folders, dtype)
    forward, embed = adapters.forward_for(MIXED), adapters.model.get_input_embeddings()
    together = rows()
    # Three rows prefilled together, the fourth joining one step later; then all decode side by side.
    mixed = run(SoloLane(forward, 0, "cpu", embed=embed), [together[:3], together[3:]])
    for i, row in enumerate(together):
        alone = rows()[i]
        single = run(Lane(forward, 0, "cpu", embed=embed), [[alone]])[id(alone)]
        got = mixed[id(row)][:len(single)]
        assert len(got) >= STEPS and all(torch.equal(a, b) for a, b in zip(got, single)), row.adapter


def test_a_solo_lane_drops_rows_with_their_caches(tiny_model_dir, folders):
    adapters = loaded(tiny_model_dir, folders, "fp32")
    lane = SoloLane(adapters.forward_for(MIXED), 0, "cpu", embed=adapters.model.get_input_embeddings())
    batch = rows()
    with torch.inference_mode():
        lane.add(batch)
        lane.remove([batch[1], batch[2]])
        assert lane.rows == [batch[0], batch[3]] and len(lane.lanes) == 2
        assert lane.step([1, 2]).shape[0] == 2
        head = lane.head(batch[3], 4)
    assert head.length == 4 and head.keys[0].shape[1] == 4
    lane.clear()
    assert lane.rows == [] and lane.lanes == []


@pytest.fixture(scope="module")
def invariant(tiny_model_dir, registry_dir):
    eng = Engine(ServeSettings(str(tiny_model_dir), registry=str(registry_dir), dtype="bf16", max_loaded_adapters=8,
                               batch_invariant=True)).start()
    yield eng
    eng.stop()


def test_in_bf16_a_mixed_batch_answers_as_each_request_alone(invariant, tiny_model_dir):
    requests = [chat("lora1", "Hi", max_tokens=12), chat("lora2", "What colour is item 3? One short sentence.", 12),
                chat(tiny_model_dir.name, "Where is my order?", 12), chat("prefix0", "Tell me about tents.", 12),
                chat("lora1", "Do you sell boots in size 44 and 45?", 12),
                chat("lora3", "Hello there", 12, temperature=0.9, seed=3)]
    singles = [invariant.generate(r, timeout=60).token_ids for r in requests]
    together = [h.result(60).token_ids for h in invariant.submit_batch(requests)]
    assert together == singles
    snap = invariant.snapshot()
    assert snap["runtime"]["batch_invariant"] is True and snap["runtime"]["dtype"] == "bfloat16"
    assert set(snap["batch_sizes"]) == {1}  # every forward ran one row
    assert snap["prefix_cache_entries"] == 0  # a cached head would make answers depend on earlier requests
