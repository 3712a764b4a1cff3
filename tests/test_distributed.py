"""Multi-process training: the same `peftkit train` under torchrun (gloo DDP on CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_processes_share_checkpoints_and_write_one_adapter(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    sets = tiny_overrides + ["data.packing=false", f"train.output_dir={run}", "train.max_steps=4", "train.save_steps=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "peftkit", "train",
           "configs/demo/fernhill.yaml", *sum([["--set", s] for s in sets], [])]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("adapter: ") == 1  # only rank 0 reports and writes
    ckpt = run / "checkpoints" / "checkpoint-4"
    # Each rank saved its own RNG state into the one (complete) checkpoint.
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    assert (ckpt / "peftkit-complete.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert not [p for p in run.rglob(".*") if p.name.startswith((".staging", ".adapter"))]
