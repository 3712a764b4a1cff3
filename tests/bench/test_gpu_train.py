"""`python -m peftkit.bench.gpu_train`: the Llama 3.1 8B LoRA/QLoRA GPU benchmark, exercised through --size tiny.

The tiny mode runs the script's whole path (model build, 4-bit quantization, peftkit's LoRA builder,
packed batches, peftkit's loss, AdamW, timing, JSON) on a 2-layer Llama; speed is never asserted.
The GPU-only parts that can be checked without a GPU are: the refusal, the MFU arithmetic, the targets.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from peftkit.bench import gpu_train, gpu_train_parts
from peftkit.bench.gpu_train import BenchError, judge, lora_flops, main

FIGURES = ("parameters", "trainable_parameters", "tokens_per_step", "seconds_per_step", "tokens_per_second",
           "examples_per_row", "mfu_vs_matmul_peak")
GPU_ONLY = ("model_gib", "peak_allocated_gib", "peak_reserved_gib", "mfu_vs_h200_peak")


def test_tiny_run_measures_every_configuration_and_writes_the_json(tmp_path, capsys):
    out = tmp_path / "gpu_train.json"
    main(["--size", "tiny", "--steps", "2", "--warmup", "1", "--out", str(out)])

    report = json.loads(out.read_text(encoding="utf-8"))
    assert [(r["method"], r["checkpointing"]) for r in report["results"]] == [
        ("lora", False), ("lora", True), ("qlora", False), ("qlora", True)]
    on_gpu = report["device"] == "cuda"
    assert set(report["versions"]) == {"torch", "transformers", "peft", "bitsandbytes", "flash_attn", "liger_kernel"}
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["peft"] != "not installed"
    assert (report["gpu"] is not None) == on_gpu
    assert report["seq"] == 128 and report["lora"] == {"target_modules": "all-linear", "rank": 16, "alpha": 32.0,
                                                       "dropout": 0.05}
    peak = report["peak_flops"]["measured_matmul"]
    for r in report["results"]:
        assert r["status"] == "ok", r["status"]
        missing = [k for k in FIGURES if not (isinstance(r.get(k), (int, float)) and r[k] > 0)]
        assert not missing, f"{r['method']}: not positive or missing: {missing}"
        assert r["tokens_per_step"] == 128 and r["examples_per_row"] > 1  # several packed examples per row
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
        assert r["mfu_vs_matmul_peak"] == pytest.approx(4 * r["parameters"] * r["tokens_per_second"] / peak)
        for key in GPU_ONLY:
            assert (isinstance(r[key], float) and r[key] > 0) if on_gpu else r[key] == "n/a on CPU", key
    lora, qlora = report["results"][0], report["results"][2]
    assert lora["linear4bit_layers"] == 0 and qlora["linear4bit_layers"] == 2 * 7  # every decoder linear, 2 layers
    assert lora["trainable_parameters"] == qlora["trainable_parameters"]  # the same adapter on either base
    printed = capsys.readouterr().out
    assert "| qlora | on |" in printed and "4 x N x tokens/s" in printed and "<= 8 GiB" in printed


def test_the_flop_formula_is_four_n_per_token():
    assert lora_flops(8_030_261_248, 2048) == 4 * 8_030_261_248 * 2048


def test_targets_are_judged_only_on_the_8b_model():
    report = {"batch": 1, "peak_flops": {"h200_bf16_nominal": gpu_train.H200_BF16_PEAK, "measured_matmul": 800e12}}
    n = 8_030_261_248
    fast = {"method": "lora", "status": "ok", "parameters": n, "tokens_per_second": 0.41 * 989e12 / (4 * n)}
    assert judge(dict(fast), report, "8b")["target_met"] is True
    assert judge(dict(fast, tokens_per_second=1000.0), report, "8b")["target_met"] is False
    assert judge(dict(fast), report, "8b")["mfu_vs_matmul_peak"] == pytest.approx(0.41 * 989 / 800)
    small = {"method": "qlora", "status": "ok", "parameters": n, "tokens_per_second": 5000.0, "peak_allocated_gib": 7.4}
    assert judge(dict(small), report, "8b")["target_met"] is True
    assert judge(dict(small, peak_allocated_gib=9.1), report, "8b")["target_met"] is False
    assert judge(dict(small), dict(report, batch=4), "8b")["target_met"] == "n/a: batch > 1"
    assert judge(dict(small), report, "tiny")["target_met"] == "n/a: tiny model"


def test_a_failing_configuration_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    real = gpu_train_parts.build_model

    def qlora_runs_out_of_memory(method, *args, **kwargs):
        if method == "qlora":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(method, *args, **kwargs)

    monkeypatch.setattr(gpu_train_parts, "build_model", qlora_runs_out_of_memory)
    report = main(["--size", "tiny", "--steps", "1", "--warmup", "0", "--checkpointing", "off",
                   "--out", str(tmp_path / "r.json")])
    lora, qlora = report["results"]
    assert lora["status"] == "ok" and lora["tokens_per_second"] > 0
    assert qlora["status"] == "OOM: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_a_spent_time_budget_skips_the_remaining_configurations(tmp_path):
    report = main(["--size", "tiny", "--methods", "lora", "--budget-minutes", "0", "--out", str(tmp_path / "r.json")])
    assert [r["status"] for r in report["results"]] == ["skipped: the 0-minute budget (--budget-minutes) was spent"] * 2


def test_unknown_methods_are_refused_with_the_choices():
    with pytest.raises(BenchError, match=r"--methods 'lora,dora': 'dora' is not measured here; choose from lora, qlora"):
        main(["--size", "tiny", "--methods", "lora,dora"])


def test_8b_is_refused_without_a_gpu_with_a_clear_message(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # torch then sees no GPU, on any machine
    proc = subprocess.run([sys.executable, "-m", "peftkit.bench.gpu_train", "--size", "8b", "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "error: --size 8b needs a CUDA GPU" in proc.stderr and "run --size tiny" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r.json").exists()
