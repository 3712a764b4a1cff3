"""Helpers shared by the dashboard tests: the API key, a hostile name, training and logging like a real run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

KEY = "dash-key-123"
HOSTILE = "<img src=x onerror=window.__pwned=1>"
"""A run name that would run script if the page ever put it into HTML as markup."""


def train_tiny(model_dir: Path, data: Path, out: Path, registry: Path) -> Path:
    """Train the tiny model for 6 steps with an eval split and the post-training evaluation; register it as chat-bot."""
    from peftkit.config import load_config
    from peftkit.train import train

    overrides = [f"model.name={model_dir}", "model.dtype=fp32", f"data.path={data}", "data.eval_path=null",
                 "data.eval_fraction=0.1", "data.max_seq_length=128", "train.max_steps=6", "train.batch_size=4",
                 "train.logging_steps=1", "train.save_steps=3", "train.learning_rate=0.005", f"train.output_dir={out}",
                 "name=chat-bot", "eval.generate=true", "eval.max_new_tokens=6", "eval.examples=2",
                 f"registry.path={registry}", "registry.domain=support", "registry.tags=[stable]"]
    result = train(load_config("configs/demo/fernhill.yaml", overrides))
    assert result.registry_ref == "chat-bot@1"
    return out


def start_live_run(folder: Path, finished: Path) -> None:
    """Write what a run has written three steps into training: run.json (running), config.yaml, TensorBoard events."""
    folder.mkdir(parents=True)
    state = json.loads((finished / "run.json").read_text())
    state = {k: v for k, v in state.items() if k != "step"}
    state["status"] = "running"
    state["config"]["name"] = "live-run"
    state["config"]["train.max_steps"] = 40
    (folder / "run.json").write_text(json.dumps(state))
    shutil.copy(finished / "config.yaml", folder / "config.yaml")
    log_steps(folder, range(1, 4))


def log_steps(folder: Path, steps) -> None:
    """Append train/loss (and eval/loss every 5th step) for these steps, as transformers' TensorBoard callback does."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder / "tensorboard"))
    for step in steps:
        writer.add_scalar("train/loss", 3.0 / step ** 0.5, step)
        writer.add_scalar("train/learning_rate", 1e-3 * (1 - step / 40), step)
        if step % 5 == 0:
            writer.add_scalar("eval/loss", 3.2 / step ** 0.5, step)
    writer.close()
