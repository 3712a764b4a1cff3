"""`peftkit bench train`: every recipe trains on one budget in its own process and is measured alike.

Speed is never asserted here (that is what the benchmark itself is for); these tests check that each
recipe reports every figure, on the same steps and the same held-out rows, and that failures stay local.
"""
from __future__ import annotations

import importlib.util
import json

import pytest

from peftkit.bench import train_bench
from peftkit.bench.train_bench import BenchError, bench_train, table
from peftkit.cli import main

POSITIVE = ("steps", "loop_seconds", "seconds_per_step", "useful_tokens", "tokens_per_second", "loss_tokens",
            "examples_per_step", "startup_seconds", "total_seconds", "peak_rss_mib", "parameters",
            "trainable_parameters", "matmul_peak_flops", "mfu", "eval_loss", "eval_tokens", "eval_rows", "train_loss")
HAS_TRL = importlib.util.find_spec("trl") is not None


@pytest.fixture
def bench_config(tmp_path, tiny_model_dir):
    """Return a config for the tiny model: 4 rows of up to 128 tokens per step, packed, 10% held out."""
    config = tmp_path / "bench.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}, dtype: fp32}}\n"
                      "data: {format: chat, max_seq_length: 128, packing: true, eval_fraction: 0.1}\n"
                      "method: {name: lora, rank: 16, alpha: 32, dropout: 0.05, target_modules: attention}\n"
                      "train: {batch_size: 4, learning_rate: 0.005, logging_steps: 1}\n", encoding="utf-8")
    return config


def test_every_recipe_is_measured_on_the_same_budget_and_a_failure_stays_local(bench_config, chat_file, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setitem(train_bench.RECIPES, "broken", "peftkit.bench.recipes.no_such_recipe")
    recipes = ["seed", "broken", "peftkit"] + ["trl"] * HAS_TRL
    result = bench_train(bench_config, recipes=recipes, steps=2, data=str(chat_file), out_dir=tmp_path / "out",
                         command="pytest")

    report = json.loads(result.json_file.read_text(encoding="utf-8"))
    by_name = {r["recipe"]: r for r in report["recipes"]}
    assert list(by_name) == recipes
    assert by_name["broken"]["status"].startswith("failed: exit 1") and "no_such_recipe" in by_name["broken"]["status"]
    ran = [by_name[name] for name in recipes if name != "broken"]
    for r in ran:
        assert r["status"] == "ok", r["status"]
        missing = [k for k in POSITIVE if not (isinstance(r.get(k), (int, float)) and r[k] > 0)]
        assert not missing, f"{r['recipe']}: not positive or missing: {missing}"
        assert r["useful_tokens"] >= r["loss_tokens"]
        assert r["startup_seconds"] < r["total_seconds"]
    assert {r["steps"] for r in ran} == {2}
    assert {r["eval_rows_sha256"] for r in ran} == {by_name["seed"]["eval_rows_sha256"]}  # the very same tokens scored
    assert {r["eval_rows"] for r in ran} == {report["data"]["eval_rows"]} == {5}  # 10% of 48 rows
    assert report["data"]["train_rows"] + report["data"]["eval_rows"] == 48
    assert {r["parameters"] for r in ran} == {by_name["seed"]["parameters"]}
    assert {r["trainable_parameters"] for r in ran} == {by_name["seed"]["trainable_parameters"]}
    assert by_name["seed"]["examples_per_step"] == 4  # padded rows: one conversation each

    expected_ratio = by_name["peftkit"]["tokens_per_second"] / by_name["seed"]["tokens_per_second"]
    assert report["ratios"]["peftkit/seed"]["tokens_per_second"] == pytest.approx(expected_ratio)
    assert ("peftkit/trl" in report["ratios"]) == HAS_TRL
    text = result.markdown_file.read_text(encoding="utf-8")
    assert "| broken | failed: exit 1" in text and "| peftkit/seed |" in text
    assert report["machine"]["cores"] >= 1 and report["command"] == "pytest"


def test_unknown_recipe_is_refused_with_the_choices(bench_config, tmp_path, capsys):
    with pytest.raises(BenchError, match="'fast' is not a recipe; choose from seed, trl, peftkit"):
        bench_train(bench_config, recipes=["seed", "fast"], out_dir=tmp_path / "out")
    assert main(["bench", "train", str(bench_config), "--recipes", "seed,fast", "--out", str(tmp_path / "cli")]) == 2
    assert "'fast' is not a recipe" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran or was written


def test_configs_the_recipes_cannot_share_are_refused(bench_config, tmp_path, chat_file):
    with pytest.raises(BenchError, match="method.name='ia3'.*--set method.name=lora"):
        bench_train(bench_config, recipes=["seed"], data=str(chat_file), overrides=["method.name=ia3"], out_dir=tmp_path)
    with pytest.raises(BenchError, match="no held-out rows to score"):
        bench_train(bench_config, recipes=["seed"], data=str(chat_file), overrides=["data.eval_fraction=0"], out_dir=tmp_path)


def test_table_shows_skipped_recipes_and_peftkit_ratios():
    figures = {"tokens_per_second": 100.0, "seconds_per_step": 2.0, "startup_seconds": 5.0, "total_seconds": 30.0,
               "peak_rss_mib": 1000.0, "mfu": 0.01, "eval_loss": 1.5}
    seed = {"recipe": "seed", "status": "ok", "dtype": "fp32", **figures}
    fast = {"recipe": "peftkit", "status": "ok", "dtype": "bf16", **figures, "tokens_per_second": 300.0, "seconds_per_step": 0.5}
    skipped = {"recipe": "trl", "status": "skipped: trl cannot be imported"}
    report = {"recipes": [seed, skipped, fast], "ratios": train_bench.ratios([seed, skipped, fast])}
    assert set(report["ratios"]) == {"peftkit/seed"}
    rows = table(report).splitlines()
    assert rows[3].startswith("| trl | skipped: trl cannot be imported |")
    assert rows[5].startswith("| peftkit/seed | | 3.00x | 0.25x | 1.00x |")


def test_a_recipe_that_cannot_run_writes_skipped_with_the_reason(tmp_path):
    from peftkit.bench.recipes import measure

    spec, out = tmp_path / "trl.spec.json", tmp_path / "trl.json"
    spec.write_text(json.dumps({"recipe": "trl"}), encoding="utf-8")

    def train(spec, meter):
        raise measure.RecipeSkipped("trl cannot be imported (No module named 'trl')")

    assert measure.main(train, ["--spec", str(spec), "--out", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8")) == {
        "recipe": "trl", "status": "skipped: trl cannot be imported (No module named 'trl')"}
