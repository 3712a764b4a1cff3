"""Training survives kills, signals and full disks: complete checkpoints only, exact resume, nothing lost."""
from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.checkpoints import DiskFullError, ResumeMismatch, TrainingInterrupted, is_complete, latest_complete_checkpoint
from peftkit.config import load_config
from peftkit.train import train

REPO = Path(__file__).resolve().parents[1]


def _adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted((run / "adapter").glob("*.safetensors")):  # adapter_model.safetensors, or model.safetensors for full
        tensors.update(load_file(f))
    return tensors


def _cfg(tiny_overrides, *extra):
    return load_config(None, tiny_overrides + ["train.max_steps=8", "train.save_steps=4", "train.save_total_limit=3",
                                               "data.eval_fraction=0", "data.packing=false", "method.dropout=0.1", *extra])


class _SignalAt:
    """Callback that sends this process a signal after a given step (as a user pressing Ctrl-C would)."""

    def __init__(self, step, sig=signal.SIGINT):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == outer.step:
                    os.kill(os.getpid(), outer.sig)

        self.step, self.sig, self.callback = step, sig, CB()


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt", "prefix", "bottleneck", "full"])
def test_signal_saves_and_resume_matches_uninterrupted_run(method, tiny_overrides, tmp_path, monkeypatch):
    tiny_overrides = tiny_overrides + [f"method.name={method}"]
    straight = train(_cfg(tiny_overrides, f"train.output_dir={tmp_path / 'straight'}"))

    # Interrupted run: SIGINT arrives during step 3 -> that step finishes, checkpoint-3 is saved, training stops.
    import peftkit.trainer as trainer_mod

    hook = _SignalAt(2)
    original_init = trainer_mod.SafeTrainer.__init__

    def init_with_signal(self, *a, **kw):
        kw["callbacks"] = list(kw.get("callbacks") or []) + [hook.callback]
        original_init(self, *a, **kw)

    monkeypatch.setattr(trainer_mod.SafeTrainer, "__init__", init_with_signal)
    run = tmp_path / "interrupted"
    with pytest.raises(TrainingInterrupted) as info:
        train(_cfg(tiny_overrides, f"train.output_dir={run}"))
    assert "step 3" in str(info.value) and "--resume" in str(info.value)
    assert info.value.exit_code == 130
    assert latest_complete_checkpoint(run / "checkpoints").name == "checkpoint-3"
    assert not (run / "adapter").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(trainer_mod.SafeTrainer, "__init__", original_init)

    resumed = train(_cfg(tiny_overrides, f"train.output_dir={run}"), resume=True)
    assert resumed.metrics["resumed_from_step"] == 3 and resumed.metrics["steps"] == 8
    a, b = _adapter_tensors(straight.output_dir), _adapter_tensors(run)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"\n{method}: resume after SIGINT at step 3 of 8: largest weight difference vs uninterrupted run = {worst:.2e}")
    assert worst < 1e-5, f"resumed adapter differs from the uninterrupted one by {worst}"


def test_resume_refuses_changed_config_data_or_base(tiny_overrides, tmp_path, chat_file):
    run = tmp_path / "run"
    with pytest.raises(DiskFullError):
        _train_with_disk_full_at(tiny_overrides, run, step=8)  # leaves an interrupted run with checkpoint-4
    assert latest_complete_checkpoint(run / "checkpoints").name == "checkpoint-4"

    with pytest.raises(ResumeMismatch) as info:
        train(_cfg(tiny_overrides, f"train.output_dir={run}", "method.rank=8"), resume=True)
    assert "method.rank (16 -> 8)" in str(info.value) and "--force-resume" in str(info.value)

    chat_file.write_text(chat_file.read_text().replace("red", "crimson"))
    with pytest.raises(ResumeMismatch, match="data"):
        train(_cfg(tiny_overrides, f"train.output_dir={run}"), resume=True)

    # Changing only how long to train is allowed, and an explicit flag overrides a real difference.
    result = train(_cfg(tiny_overrides, f"train.output_dir={run}", "train.max_steps=10"), resume=True, force_resume=True)
    assert result.metrics["resumed_from_step"] == 4 and result.metrics["steps"] == 10


def _train_with_disk_full_at(tiny_overrides, run: Path, step: int):
    """Train with torch.save failing with ENOSPC when the checkpoint of `step` writes its optimizer."""
    import peftkit.trainer as trainer_mod

    real_save = torch.save
    state = {}

    def failing_save(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt") and state["trainer"].state.global_step == step:
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    original_init = trainer_mod.SafeTrainer.__init__

    def init(self, *a, **kw):
        state["trainer"] = self
        original_init(self, *a, **kw)

    trainer_mod.SafeTrainer.__init__ = init
    torch.save = failing_save
    try:
        return train(_cfg(tiny_overrides, f"train.output_dir={run}"))
    finally:
        torch.save = real_save
        trainer_mod.SafeTrainer.__init__ = original_init


def test_full_disk_during_checkpoint_keeps_previous_and_says_so(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(DiskFullError) as info:
        _train_with_disk_full_at(tiny_overrides, run, step=8)
    assert "no space left" in str(info.value) and "previous checkpoints and the adapter are intact" in str(info.value)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["checkpoint-4"], names  # no partial checkpoint-8, no staging folder
    assert is_complete(run / "checkpoints" / "checkpoint-4")


def test_full_disk_during_final_save_keeps_previous_adapter(tiny_overrides, tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = train(_cfg(tiny_overrides, f"train.output_dir={run}"))
    before = _adapter_tensors(run)

    import peftkit.train as train_mod

    def full_disk(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_mod, "model_card", full_disk)  # fails inside the staged adapter write
    with pytest.raises(DiskFullError, match="previous adapter is intact"):
        train(_cfg(tiny_overrides, f"train.output_dir={run}", "train.seed=7"))
    after = _adapter_tensors(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (run / "adapter" / "README.md").is_file() and first.adapter_dir == run / "adapter"
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def _cli_args(tiny_overrides, run: Path, steps: int, save_steps: int) -> list[str]:
    sets = tiny_overrides + [f"train.output_dir={run}", f"train.max_steps={steps}", f"train.save_steps={save_steps}",
                             "train.save_total_limit=2", "data.eval_fraction=0", "train.logging_steps=1"]
    return [sys.executable, "-m", "peftkit", "train", "configs/demo/fernhill.yaml", *sum([["--set", s] for s in sets], [])]


@pytest.mark.slow
def test_sigkill_at_random_points_always_resumes(tiny_overrides, tmp_path):
    """Kill -9 the trainer at random moments (one trial lands mid-save); each run resumes and finishes."""
    rng = random.Random(1234)
    steps, save_steps = 12, 2
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    report = []
    for trial in range(4):
        run = tmp_path / f"trial{trial}"
        mid_save = trial == 0
        trial_env = {**env, "PEFTKIT_FAULT_SAVE_PAUSE": "2"} if mid_save else env
        proc = subprocess.Popen(_cli_args(tiny_overrides, run, steps, save_steps), cwd=REPO, env=trial_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log_lines: list[str] = []
        reader = threading.Thread(target=lambda: log_lines.extend(proc.stdout), daemon=True)
        reader.start()
        target, deadline = rng.randint(3, 9), time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            logged = len(re.findall(r"(?m)^step +\d+/\d+  loss ", "".join(log_lines)))
            staging = list((run / "checkpoints").glob(".staging-*")) if (run / "checkpoints").exists() else []
            if (mid_save and staging and logged >= 3) or (not mid_save and logged >= target):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"trial {trial}: training ended before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join(timeout=5)
        done_before_kill = len(re.findall(r"(?m)^step +\d+/\d+  loss ", "".join(log_lines)))
        kept = latest_complete_checkpoint(run / "checkpoints")
        kept_step = int(kept.name.split("-")[-1]) if kept else 0
        assert done_before_kill - kept_step <= save_steps, (trial, done_before_kill, kept_step)
        for ckpt in (run / "checkpoints").glob("checkpoint-*"):
            assert is_complete(ckpt), f"trial {trial}: {ckpt.name} visible but incomplete"

        # The same command again detects the interrupted run and resumes it.
        again = subprocess.run(_cli_args(tiny_overrides, run, steps, save_steps), cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["steps"] == steps
        assert metrics["resumed_from_step"] == (kept_step or None)
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
        report.append((trial, "mid-save" if mid_save else "random", done_before_kill, kept_step))
    print("\nkill trials (trial, where, steps done at kill, resumed from):", report)
