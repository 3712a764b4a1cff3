"""train.learning_rate: auto: a short learning-rate range test on the run's own rows, before training.

The test trains a few dozen optimizer steps (fresh AdamW) with a rate growing exponentially across
the method's bounds (CATALOG[method].lr_bounds), all on the same small batch of the run's rows,
recording the batch's loss before each step: one batch, so the curve shows what the rate does and not
how hard each row is (fresh rows per step gave losses varying 3.1-5.3 from row to row on the
shop data, drowning the rate's effect; the same batch falls smoothly until the rate is too high). Then it puts back
the trainable weights and the random-number generators exactly as they were, so the real run starts
from the same point it would have with a fixed rate.

The rule: smooth the losses (an exponential moving average, debiased), take the rate where the
smoothed loss is lowest (before it diverges, i.e. rises above DIVERGED times that minimum), and
divide it by DIVISOR; keep the result inside the bounds. The loss bottoms out where the rate has
just become too high, so a fraction of it is a rate that still learns fast but stays stable
(Smith 2017, "Cyclical learning rates"; fastai's `lr_find`). DIVISOR is that convention's, not tuned
here; docs/methods.md ("Presets measured on three data sets") compares the rates it gives with fixed ones.

Cost: the test feeds at most COST_SHARE of the tokens the run will train on, in at most MAX_STEPS
steps of at most a batch of windows of WINDOW tokens (a long or packed row is cut to the window that
starts at its first trained token: the rate's effect shows as well on 256 tokens as on 1024); a run
too short for MIN_STEPS such steps pays a larger share, printed. On resume the rate chosen at the start
is kept (run.json), never searched again.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch


log = logging.getLogger(__name__)

AUTO = "auto"
MAX_STEPS = 32
MIN_STEPS = 16
MIN_ROWS = 2
WINDOW = 256
COST_SHARE = 0.05
SMOOTHING = 0.5
DIVERGED = 4.0
DIVISOR = 4.0


@dataclass
class RateSearch:
    """What the range test tried, saw and chose (metrics.json's learning_rate_search)."""

    chosen: float
    low: float
    high: float
    steps: int
    rows_per_step: int
    seconds: float
    planned_tokens: int
    tokens: int = 0
    """Tokens the test fed (its cost), against planned_tokens for the whole run."""
    rates: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    rule: str = f"lowest smoothed loss / {DIVISOR:g}"
    minimum_at: float | None = None
    diverged_at: float | None = None

    @property
    def share(self) -> float:
        """Tokens the test fed, as a share of the tokens the run trains on: its cost."""
        return self.tokens / max(self.planned_tokens, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "share_of_run": self.share}

    @classmethod
    def from_dict(cls, d: dict) -> "RateSearch":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def summary(self) -> str:
        return (f"learning rate: auto -> {self.chosen:.3g} ({self.rule}; {self.steps} steps of {self.rows_per_step} "
                f"window(s) from {self.low:g} to {self.high:g}, {self.seconds:.1f} s, {self.share:.1%} of the run's tokens)")


def search_plan(planned_tokens: int, batch_size: int, row_tokens: float) -> tuple[int, int]:
    """Return (steps, windows per step) for a run that trains on planned_tokens tokens in batches of batch_size
    rows of row_tokens tokens on average."""
    budget = COST_SHARE * planned_tokens / min(row_tokens, WINDOW)  # in windows
    per_step = int(min(max(batch_size, MIN_ROWS), max(MIN_ROWS, budget // MAX_STEPS)))
    steps = int(min(MAX_STEPS, max(MIN_STEPS, budget // per_step)))
    return steps, per_step


def mean_row_tokens(dataset, sample: int = 1000) -> float:
    """Return the mean length of dataset's rows (from at most sample evenly spread rows)."""
    step = max(1, len(dataset) // sample)
    lengths = [len(dataset[i]["input_ids"]) for i in range(0, len(dataset), step)]
    return sum(lengths) / max(len(lengths), 1)


def window(row: dict, length: int = WINDOW) -> dict:
    """Return row's list columns cut to length tokens from its first trained label (a short row is kept whole)."""
    labels = row["labels"]
    if len(labels) <= length:
        return row
    start = next((i for i, label in enumerate(labels) if label != -100), 0)
    start = max(0, min(start - 1, len(labels) - length))  # the token before the first label predicts it
    return {k: v[start:start + length] if isinstance(v, list) and len(v) == len(labels) else v for k, v in row.items()}


def choose(rates: list[float], losses: list[float]) -> tuple[float, list[float], float, float | None]:
    """Return (chosen rate, smoothed losses, rate at the lowest smoothed loss, rate where it diverged or None)."""
    smoothed, average = [], 0.0
    for i, loss in enumerate(losses):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed.append(average / (1 - SMOOTHING ** (i + 1)))
    best, diverged = 0, None
    for i, value in enumerate(smoothed):
        if not math.isfinite(value) or value > DIVERGED * smoothed[best]:
            diverged = i
            break
        if value < smoothed[best]:
            best = i
    return rates[best] / DIVISOR, smoothed, rates[best], rates[diverged] if diverged is not None else None


def find_learning_rate(trainer, model, dataset, collator, *, bounds: tuple[float, float], planned_rows: int,
                       seed: int) -> RateSearch:
    """Return the range test's result on dataset's rows, for a run that feeds each process planned_rows of them;
    the model and every RNG are left exactly as found."""
    low, high = bounds
    row_tokens = mean_row_tokens(dataset)
    planned_tokens = round(planned_rows * row_tokens)
    steps, per_step = search_plan(planned_tokens, trainer.args.per_device_train_batch_size, row_tokens)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    saved = {name: p.detach().clone() for name, p in trainable}
    rng = _rng_state()
    was_training = model.training
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=low, weight_decay=trainer.args.weight_decay)
    rows = [window(dataset[order[k % len(order)]]) for k in range(per_step)]
    rates, losses, fed = [], [], 0
    started = time.perf_counter()
    try:
        model.train()
        for step in range(steps):
            rate = low * (high / low) ** (step / max(steps - 1, 1))
            for group in optimizer.param_groups:
                group["lr"] = rate
            fed += sum(len(r["input_ids"]) for r in rows)
            loss = trainer.compute_loss(model, trainer._prepare_inputs(collator(rows)))
            loss.backward()
            if trainer.args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for _, p in trainable], trainer.args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rates.append(rate)
            losses.append(float(loss.detach()))
            if choose(rates, losses)[3] is not None:
                break  # diverged: the rest of the range only costs time
    finally:
        with torch.no_grad():
            for name, p in trainable:
                p.copy_(saved[name])
                p.grad = None
        _set_rng_state(rng)
        model.train(was_training)
    chosen, smoothed, minimum_at, diverged_at = choose(rates, losses)
    chosen = min(max(chosen, low), high)
    chosen = _agree(chosen)
    return RateSearch(chosen=chosen, low=low, high=high, steps=len(rates), rows_per_step=per_step,
                      seconds=time.perf_counter() - started, planned_tokens=planned_tokens, tokens=fed, rates=rates, losses=losses,
                      smoothed=smoothed, minimum_at=minimum_at, diverged_at=diverged_at)


def plot_search(search: RateSearch, path: Path) -> None:
    """Draw the range test's loss against the rate (log scale), with the minimum and the chosen rate marked."""
    from peftkit.lineage import new_plot, save_plot

    fig, ax = new_plot()
    ax.plot(search.rates, search.losses, alpha=0.35, marker=".", label="loss per step")
    ax.plot(search.rates, search.smoothed, label="smoothed")
    if search.minimum_at is not None:
        ax.axvline(search.minimum_at, color="grey", linestyle=":", label=f"lowest {search.minimum_at:.3g}")
    ax.axvline(search.chosen, color="red", linestyle="--", label=f"chosen {search.chosen:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test")
    save_plot(fig, ax, path)


def _agree(rate: float) -> float:
    """Return rank 0's rate on every rank of a distributed run (the ranks' tests can differ in the last bit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [rate]
        torch.distributed.broadcast_object_list(box, src=0)
        return float(box[0])
    return rate


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
