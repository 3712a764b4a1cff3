"""`peftkit compare`: the plan per method, the table, the chart and the 8B figures (training faked, except one real run)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit import compare as cmp
from peftkit import cli
from peftkit.config import load_config
from peftkit.methods import MethodError


CONFIG = Path(__file__).with_name("compare.yaml")  # fixed values: the shared presets change as the demo is tuned


def fake_runs(monkeypatch, fail: str | None = None) -> list:
    """Replace the training subprocess by one that writes plausible metrics; return the calls."""
    calls = []

    def run_method(config_file, run, *, log_file):
        calls.append((run.method, load_config(config_file)))
        if run.method == fail:
            run.error = "exit 1: out of memory | killed"
            return
        adapter = run.run_dir / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text("{}")
        (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 2048)
        (adapter / "tokenizer.json").write_bytes(b"\0" * 10_000)  # not part of the adapter's size
        trainable = 134_515_008 if run.method == "full" else 1000
        run.metrics = {"trainable_parameters": trainable, "total_parameters": 134_515_008 + (trainable != 134_515_008) * 1000,
                       "peak_memory_mb": 900.0, "tokens_per_second": 120.0, "train_loss_first": 2.5, "train_loss": 1.25,
                       "eval_loss": 1.5, "eval_perplexity": 4.48, "eval_token_accuracy": 0.6125, "wall_time_s": 61.0,
                       "torch_threads": 2}
        run.adapter_bytes = cmp.adapter_bytes(adapter)

    monkeypatch.setattr(cmp, "run_method", run_method)
    return calls


def test_table_chart_and_8b_figures_are_written(monkeypatch, tmp_path, tiny_overrides, capsys):
    calls = fake_runs(monkeypatch, fail="prompt")
    out = tmp_path / "cmp"
    argv = [str(CONFIG), "--methods", "lora,prompt,full", "--out", str(out), "--lr", "full=2e-5",
            "--set", "train.max_steps=30", "--set", "train.batch_size=8"]
    assert cli.main(["compare", *argv]) == 1  # one method failed
    table = (out / "methods.md").read_text()
    assert f"peftkit compare {CONFIG} --methods lora,prompt,full" in table
    assert "30 optimizer steps of batch 8" in table
    assert "cores, no GPU, torch " in table and ", 2 torch threads per run." in table  # what the runs used
    assert "| lora | rank 16, alpha 32, attention | 0.0005 | 1,000 | 0.000743% | 2.002 KiB | 900 MiB | 120 | 2.500 → 1.250 | 1.500 | 61.3% | 61 s |" in table
    assert "| prompt | 20 virtual tokens | 0.03 | failed: exit 1: out of memory / killed |" in table
    assert "| full | every weight | 2e-05 | 134,515,008 | 100% |" in table
    # The 8B section: LoRA's preset is rank 16 on every linear layer.
    assert "| lora | rank 16, alpha 32, all-linear | 41,943,040 | 0.5223% | 167,772,160 B (160 MiB) | float32 | 14.96 GiB |" in table
    assert (out / "methods.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "41,943,040" in printed and str(out / "methods.md") in printed
    # Each method got its own frozen config, run folder and learning rate; the LoRA family keeps the config's.
    plans = dict(calls)
    assert plans["full"].train.output_dir == str(out / "full") and plans["full"].train.learning_rate == 2e-5
    assert plans["prompt"].train.learning_rate == 0.03 and plans["lora"].train.learning_rate == 5e-4
    assert {c.method.name for c in plans.values()} == {"lora", "prompt", "full"}
    assert all(c.train.max_steps == 30 for c in plans.values())


def test_bad_method_or_config_fails_before_any_training(monkeypatch, tmp_path):
    calls = fake_runs(monkeypatch)
    with pytest.raises(MethodError, match="--methods lora,lorra: lorra is not a method; choose from lora"):
        cmp.compare(CONFIG, ["lora", "lorra"], out_dir=tmp_path)
    from peftkit.config import ConfigError

    with pytest.raises(ConfigError, match="train.max_step"):
        cmp.compare(CONFIG, ["lora", "ia3"], overrides=["train.max_step=3"], out_dir=tmp_path)
    assert calls == []


def test_bad_lr_option_says_how_to_write_it(tmp_path):
    assert cli.main(["compare", str(CONFIG), "--lr", "full:2e-5", "--out", str(tmp_path)]) == 2


def test_one_real_method_trains_in_its_own_process(tiny_overrides, tmp_path):
    from peftkit.data import prepare  # noqa: F401 - the run needs the data pipeline

    out = tmp_path / "cmp"
    overrides = [o for o in tiny_overrides if not o.startswith(("train.output_dir", "train.max_steps"))] + ["train.max_steps=2"]
    result = cmp.compare(CONFIG, ["ia3"], overrides=overrides, out_dir=out)
    (run,) = result.runs
    assert run.error is None, run.error
    metrics = json.loads((out / "ia3" / "metrics.json").read_text())
    assert run.metrics == metrics and metrics["steps"] == 2 and metrics["peak_memory_mb"] > 0
    assert run.adapter_bytes == sum((out / "ia3" / "adapter" / n).stat().st_size
                                    for n in ("adapter_config.json", "adapter_model.safetensors"))
    assert "| ia3 | scales k_proj, v_proj, down_proj | 0.03 |" in (out / "methods.md").read_text()
