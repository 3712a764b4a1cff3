"""What a training run records: its metrics, its lineage, the adapter's model card and the loss plot."""
from __future__ import annotations

import datetime as dt
import math
import resource
from pathlib import Path

import torch

from peftkit import __version__
from peftkit.atomic import atomic_path
from peftkit.config import RunConfig, config_to_dict
from peftkit.eval_report import card_section
from peftkit.prompting import Prompting


def run_metrics(cfg: RunConfig, trainer, model, evaluation: dict, *, wall: float, start_from: Path | None,
                data_stats: dict, search=None, stopping: dict | None = None) -> dict:
    """Return metrics.json's content: losses, speed, size, memory, the data's statistics, the rate (and the range
    test behind an automatic one: search, a peftkit.lr_finder.RateSearch) and train.early_stopping's record."""
    from peftkit.checkpoints import checkpoint_step
    from peftkit.models import resolve_dtype

    history = trainer.state.log_history
    eval_loss = evaluation.get("eval_loss")
    trainable, total = count_parameters(model)
    return {
        "train_loss": last_logged(history, "loss"),
        "train_loss_first": first_logged(history, "loss"),
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss) if eval_loss is not None and eval_loss < 50 else None,
        "eval_token_accuracy": evaluation.get("eval_token_accuracy"),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "resumed_from_step": checkpoint_step(start_from) if start_from else None,
        "tokens_trained": trainer.tokens_seen,
        "tokens_per_second": trainer.tokens_seen / wall if wall > 0 else None,
        "wall_time_s": wall,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": 100 * trainable / total,
        "peak_memory_mb": peak_memory_mb(),
        "device": str(next(model.parameters()).device),
        "dtype": str(resolve_dtype(cfg.model.dtype)).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "compile_time_s": compile_time(cfg),
        "dtype_probe": dtype_probe(cfg.model.dtype),
        "data": data_stats,
        "learning_rate": trainer.args.learning_rate,
        "learning_rate_search": None if search is None else
        {**search.to_dict(), "share_of_time": search.seconds / (search.seconds + wall) if wall > 0 else None},
        "early_stopping": stopping,
    }


def compile_time(cfg: RunConfig) -> float | None:
    """Return the seconds train.compile spent compiling (inside the training wall time), or None when it was off."""
    if not cfg.train.compile:
        return None
    from peftkit.compiling import compile_seconds

    return compile_seconds()


def dtype_probe(dtype: str) -> dict | None:
    """Return the measured probe behind model.dtype=auto on a CPU (None when the dtype was set or a GPU chose)."""
    if dtype != "auto" or torch.cuda.is_available():
        return None
    from peftkit.hardware import cpu_probe

    return cpu_probe()


def build_lineage(cfg: RunConfig, state: dict, metrics: dict, *, base_config: dict | None, prompting: Prompting) -> dict:
    """Return the adapter's peftkit.json: where it came from, how it was trained and prompted, what it scored."""
    return {
        "peftkit_version": __version__,
        "method": cfg.method.name,
        "base_model": cfg.model.name,
        "base_fingerprint": state["base_fingerprint"],
        "base_config": base_config,
        "data_fingerprint": state["data_fingerprint"],
        "config": config_to_dict(cfg),
        "prompting": prompting.to_dict(),
        "metrics": metrics,
        "parent": cfg.method.init_from,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def count_parameters(model) -> tuple[int, int]:
    """Return (trainable, total) parameter counts; 4-bit weights count as their logical size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def peak_memory_mb() -> float:
    """Return peak memory in MiB: GPU allocations when on a GPU, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def last_logged(history: list[dict], key: str):
    """Return the last value logged under key, or None."""
    values = [h[key] for h in history if key in h]
    return values[-1] if values else None


def first_logged(history: list[dict], key: str):
    """Return the first value logged under key, or None."""
    values = [h[key] for h in history if key in h]
    return values[0] if values else None


def model_card(cfg: RunConfig, lineage: dict) -> str:
    """Return the adapter's README.md: base, method, data, config and metrics."""
    import yaml

    m = lineage["metrics"]
    fmt = lambda v: "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    rows = [("train loss (first -> last)", f"{fmt(m['train_loss_first'])} -> {fmt(m['train_loss'])}"),
            ("eval loss", fmt(m["eval_loss"])), ("eval perplexity", fmt(m["eval_perplexity"])),
            ("eval token accuracy", fmt(m.get("eval_token_accuracy"))),
            ("steps", fmt(m["steps"])), ("tokens trained", fmt(m["tokens_trained"])),
            ("tokens per second", fmt(m["tokens_per_second"])), ("wall time (s)", fmt(m["wall_time_s"])),
            ("trainable parameters", f"{m['trainable_parameters']:,} of {m['total_parameters']:,} ({m['trainable_percent']:.3f}%)"),
            ("peak memory (MiB)", fmt(m["peak_memory_mb"])), ("device / dtype", f"{m['device']} / {m['dtype']}"),
            ("learning rate", rate_text(m))]
    if m.get("early_stopping"):
        e = m["early_stopping"]
        rows.append(("early stopping", f"best eval loss {fmt(e['best_eval_loss'])} at step {e['best_step']} (kept); "
                                       f"stopped at step {e['stopped_at_step']}, patience {e['patience']}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    data = cfg.data.path or ", ".join(str(s.get("path")) for s in cfg.data.sources)
    return f"""---
base_model: {cfg.model.name}
library_name: peft
tags: [peftkit, {cfg.method.name}]
---
# {cfg.name}

A **{cfg.method.name}** adapter for `{cfg.model.name}`, trained with peftkit {lineage['peftkit_version']} on {lineage['created_at']}.

- Base model: `{cfg.model.name}` (fingerprint `{lineage['base_fingerprint']}`)
- Data: `{data}` (format {cfg.data.format}, fingerprint `{lineage['data_fingerprint']}`)
- Parent adapter: {lineage['parent'] or 'none'}

## Metrics
| metric | value |
|---|---|
{table}

## Use
```python
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_DIR), ADAPTER_DIR)
```
or `peftkit generate --adapter ADAPTER_DIR --prompt "..."`.

{card_section(m["evaluation"]) if m.get("evaluation") else ""}
## Config
```yaml
{yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip()}
```
"""


def rate_text(m: dict) -> str:
    """Return the model card's learning-rate cell: the rate, and how train.learning_rate=auto found it."""
    rate, search = m.get("learning_rate"), m.get("learning_rate_search")
    if rate is None:
        return "n/a"
    if not search:
        return f"{rate:.3g}"
    return (f"{rate:.3g} (auto: {search['rule']} in a range test of {search['steps']} steps from {search['low']:g} "
            f"to {search['high']:g}; lowest at {search['minimum_at']:.3g}, {search['share_of_run']:.1%} of the run's tokens)")


def plot_losses(history: list[dict], path: Path) -> None:
    """Draw train and eval loss against steps into a PNG."""
    fig, ax = new_plot()
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    save_plot(fig, ax, path)


def new_plot():
    """Return (figure, axes) for one of a run's PNG charts (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4))


def save_plot(fig, ax, path: Path) -> None:
    """Finish a chart from new_plot (grid, legend) and write it to path atomically."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
