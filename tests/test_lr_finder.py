"""train.learning_rate: auto (a range test before training) and train.early_stopping (keep the best evaluation)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from peftkit.config import ConfigError, load_config
from peftkit.lr_finder import DIVISOR, MIN_ROWS, MAX_STEPS, MIN_STEPS, WINDOW, choose, search_plan, window
from peftkit.methods.catalog import CATALOG
from peftkit.train import train

AUTO = ["train.learning_rate=auto", "train.max_steps=-1", "train.epochs=1"]


def test_the_plan_spends_at_most_a_twentieth_of_the_tokens_when_the_run_is_long_enough():
    assert search_plan(10_000_000, 8, 1024) == (MAX_STEPS, 8)
    steps, per_step = search_plan(400_000, 8, 1000)
    assert steps * per_step * WINDOW <= 0.05 * 400_000 and MIN_STEPS <= steps <= MAX_STEPS
    assert search_plan(40 * 100, 8, 100) == (MIN_STEPS, 2)  # a tiny run still gets a usable curve: more than 5%, reported


def test_a_window_starts_at_the_first_trained_token():
    row = {"input_ids": list(range(1000)), "labels": [-100] * 600 + list(range(600, 1000)), "position_ids": list(range(1000)),
           "length": 1000}
    cut = window(row, 256)
    assert cut["input_ids"] == list(range(599, 855)) and cut["labels"][0] == -100 and cut["labels"][1] == 600
    assert cut["position_ids"] == cut["input_ids"] and cut["length"] == 1000
    late = {"input_ids": list(range(300)), "labels": [-100] * 290 + [1] * 10}
    assert window(late, 256)["input_ids"] == list(range(44, 300))  # never past the end
    short = {"input_ids": [1, 2], "labels": [-100, 2]}
    assert window(short, 256) is short


def test_the_rule_takes_a_fraction_of_the_lowest_smoothed_loss_before_divergence():
    rates = [10 ** (-5 + i * 0.25) for i in range(17)]
    losses = [4.0] * 6 + [3.5, 3.0, 2.5, 2.0, 1.8, 1.9, 2.5, 5.0, 20.0, math.nan, math.nan]
    chosen, smoothed, lowest, diverged = choose(rates, losses)
    at = smoothed.index(min(smoothed[:diverged and rates.index(diverged)]))
    assert lowest == rates[at] and chosen == pytest.approx(lowest / DIVISOR)
    assert diverged is not None and diverged > lowest
    assert choose(rates[:5], [3.0, 3.0, 3.0, 3.0, 3.0])[2] == rates[0]  # flat: the lowest rate, never a guess


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "prefix", "prompt", "ia3", "bottleneck", "full"])
def test_auto_picks_a_rate_inside_the_bounds_and_leaves_model_and_rngs_as_found(tiny_overrides, method):
    from peftkit.data import prepare
    from peftkit.lr_finder import find_learning_rate
    from peftkit.models import load_tokenizer
    from peftkit.train import build_model, build_trainer
    from peftkit import checkpoints as ckpts

    cfg = load_config(None, tiny_overrides + AUTO + [f"method.name={method}", "method.dropout=0.1"])
    tokenizer = load_tokenizer(cfg.model.name)
    prepared = prepare(cfg.data, tokenizer, seed=cfg.train.seed)
    model = build_model(cfg)
    trainer = build_trainer(cfg, model, tokenizer, prepared, cfg.train.output_dir, ckpts.GracefulStop())
    before, rng = _params(model), torch.get_rng_state()
    bounds = CATALOG[method].lr_bounds
    search = find_learning_rate(trainer, model, prepared.train, trainer.data_collator, bounds=bounds,
                                planned_rows=200, seed=3)
    assert bounds[0] <= search.chosen <= bounds[1]
    assert search.steps >= 2 and len(search.losses) == search.steps == len(search.rates)
    assert search.rates == sorted(search.rates) and search.rates[0] == pytest.approx(bounds[0])
    after = _params(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # bit for bit
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    again = find_learning_rate(trainer, model, prepared.train, trainer.data_collator, bounds=bounds, planned_rows=200,
                               seed=3)
    assert again.losses == search.losses and again.chosen == search.chosen  # same seed, same rows, same answer


def test_auto_in_a_run_records_the_rate_its_curve_and_its_cost(tiny_overrides):
    result = train(load_config(None, tiny_overrides + AUTO + ["data.packing=true"]))
    m = result.metrics
    search = m["learning_rate_search"]
    assert m["learning_rate"] == search["chosen"]
    low, high = CATALOG["lora"].lr_bounds
    assert low <= m["learning_rate"] <= high and search["rule"] == f"lowest smoothed loss / {DIVISOR:g}"
    assert 0 < search["share_of_run"] and search["tokens"] > 0 and 0 < search["share_of_time"] < 1 and search["seconds"] > 0
    assert (result.output_dir / "lr_search.png").stat().st_size > 1000
    assert json.loads((result.output_dir / "metrics.json").read_text())["learning_rate_search"]["chosen"] == search["chosen"]
    card = (result.adapter_dir / "README.md").read_text()
    assert f"{m['learning_rate']:.3g} (auto: lowest smoothed loss" in card
    # The Trainer trained at the chosen rate: the schedule's logged rates peak at it.
    from peftkit.checkpoints import latest_complete_checkpoint

    state = json.loads((latest_complete_checkpoint(result.output_dir / "checkpoints") / "trainer_state.json").read_text())
    logged = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
    assert logged and max(logged) <= m["learning_rate"] * (1 + 1e-6) and max(logged) > 0.5 * m["learning_rate"]


def test_a_fixed_rate_is_never_searched(tiny_overrides):
    result = train(load_config(None, tiny_overrides))
    assert result.metrics["learning_rate"] == 0.005 and result.metrics["learning_rate_search"] is None
    assert not (result.output_dir / "lr_search.png").exists()


def test_a_bad_rate_names_the_fix():
    with pytest.raises(ConfigError, match="a number .* or auto"):
        load_config(None, ["train.learning_rate=fast"])
    with pytest.raises(ConfigError, match="early_stopping"):
        load_config(None, ["train.early_stopping=-1"])


def test_resume_keeps_the_rate_chosen_at_the_start(tiny_overrides, tmp_path, monkeypatch):
    import peftkit.lr_finder as finder
    from test_reliability import _SignalAt, _adapter_tensors

    from peftkit.checkpoints import TrainingInterrupted
    import peftkit.trainer as trainer_mod

    sets = tiny_overrides + AUTO + ["train.max_steps=8", "train.save_steps=4", "data.eval_fraction=0", "data.packing=false"]
    straight = train(load_config(None, sets + [f"train.output_dir={tmp_path / 'straight'}"]))
    hook, original_init = _SignalAt(2), trainer_mod.SafeTrainer.__init__

    def init_with_signal(self, *a, **kw):
        kw["callbacks"] = list(kw.get("callbacks") or []) + [hook.callback]
        original_init(self, *a, **kw)

    monkeypatch.setattr(trainer_mod.SafeTrainer, "__init__", init_with_signal)
    run = tmp_path / "interrupted"
    with pytest.raises(TrainingInterrupted):
        train(load_config(None, sets + [f"train.output_dir={run}"]))
    monkeypatch.setattr(trainer_mod.SafeTrainer, "__init__", original_init)
    monkeypatch.setattr(finder, "find_learning_rate", lambda *a, **k: pytest.fail("a resume searched again"))
    resumed = train(load_config(None, sets + [f"train.output_dir={run}"]), resume=True)
    assert resumed.metrics["resumed_from_step"] == 3
    assert resumed.metrics["learning_rate"] == straight.metrics["learning_rate"]
    a, b = _adapter_tensors(straight.output_dir), _adapter_tensors(run)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_early_stopping_keeps_the_best_evaluation(tiny_overrides, tmp_path):
    from safetensors.torch import load_file

    # Held-out answers that contradict the training ones: the eval loss falls while the format is learned, then climbs.
    def rows(answer, start, n):
        return [{"messages": [{"role": "user", "content": f"Is item {i} in stock?"},
                              {"role": "assistant", "content": f"{answer} {answer} {answer}, item {i}."}]}
                for i in range(start, start + n)]
    train_file, eval_file = tmp_path / "yes.jsonl", tmp_path / "no.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows("Yes", 0, 40)))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows("No", 40, 8)))
    sets = tiny_overrides + [f"data.path={train_file}", f"data.eval_path={eval_file}", "train.learning_rate=0.01",
                             "train.max_steps=40", "train.eval_steps=2", "train.save_steps=100", "train.early_stopping=2",
                             "train.save_total_limit=1", "train.warmup_ratio=0"]
    result = train(load_config(None, sets))
    e = result.metrics["early_stopping"]
    print(e)
    assert e["stopped_early"] and e["stopped_at_step"] < 30 and e["best_step"] < e["stopped_at_step"]
    assert e["stopped_at_step"] == e["best_step"] + 2 * 2  # patience 2: two evaluations without a better loss
    assert result.metrics["eval_loss"] == e["best_eval_loss"]
    best = result.output_dir / "checkpoints" / f"checkpoint-{e['best_step']}"
    kept, saved = load_file(best / "adapter_model.safetensors"), load_file(result.adapter_dir / "adapter_model.safetensors")
    assert kept.keys() == saved.keys() and all(torch.equal(kept[k], saved[k]) for k in kept)


def test_early_stopping_needs_an_eval_split(tiny_overrides):
    from peftkit.errors import PeftkitError

    with pytest.raises(PeftkitError, match="needs an eval split"):
        train(load_config(None, tiny_overrides + ["data.eval_fraction=0", "train.early_stopping=2"]))
