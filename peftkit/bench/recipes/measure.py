"""What every recipe process measures the same way: the loop's clock, the tokens fed, the held-out loss.

A recipe module defines `train(spec, meter) -> model` and ends with `sys.exit(measure.main(train))`.
The recipe attaches the Meter to its Trainer; the Meter times from the first step's start to the end
of training, counts the non-padding tokens of every batch the model is fed, and measures start-up from
the moment the process started (model load and data preparation included). The held-out loss is
scored on the trained model, cast to fp32, with peftkit's teacher-forced loss on the same rows for all.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from peftkit import atomic

IGNORE = -100
EVAL_BATCH = 8
_LOADED = time.time()


class RecipeSkipped(Exception):
    """The recipe cannot run on this machine (say, its library is not installed); the message says why."""


class Meter(TrainerCallback):
    """Times the training loop and counts what it is fed; attach it to one Trainer."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.first_wall: float | None = None
        self.end: float | None = None
        self.steps = 0
        self.tokens = self.loss_tokens = self.sequences = 0
        self.train_loss: float | None = None

    def attach(self, trainer, pad_id: int | None) -> None:
        """Add the clock to trainer's callbacks and count every batch its training_step receives.

        pad_id: the id that marks padding where a batch has no 2D attention mask (None: such batches have no padding).
        """
        trainer.add_callback(self)
        step = trainer.training_step

        def counted(model, inputs, *args, **kwargs):
            self.add_batch(inputs, pad_id)
            return step(model, inputs, *args, **kwargs)

        trainer.training_step = counted

    def add_batch(self, inputs: dict, pad_id: int | None) -> None:
        """Count one batch's real tokens, trained tokens and sequences (packed examples count one each)."""
        import torch

        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            real = mask.bool()
        elif pad_id is not None:
            real = ids != pad_id
        else:
            real = torch.ones_like(ids, dtype=torch.bool)
        positions = inputs.get("position_ids")
        self.tokens += int(real.sum())
        self.sequences += int(((positions == 0) & real).sum()) if positions is not None else int(real.any(dim=1).sum())
        labels = inputs.get("labels")
        if labels is not None:  # position t predicts token t+1, so the first label never trains
            self.loss_tokens += int((labels[:, 1:] != IGNORE).sum())

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first is None:
            self.first, self.first_wall = time.perf_counter(), time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train_loss = float(logs["loss"])

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()
        self.steps = state.global_step

    def summary(self, started: float) -> dict[str, Any]:
        """Return the loop's figures; started is when the process began (epoch seconds)."""
        if self.first is None or self.end is None or not self.steps:
            raise RuntimeError("the training loop never ran a step, so there is nothing to measure")
        loop = self.end - self.first
        return {"steps": self.steps, "loop_seconds": loop, "seconds_per_step": loop / self.steps,
                "useful_tokens": self.tokens, "tokens_per_second": self.tokens / loop, "loss_tokens": self.loss_tokens,
                "examples_per_step": self.sequences / self.steps, "startup_seconds": self.first_wall - started,
                "train_loss": self.train_loss}


def process_started() -> float:
    """Return when this process started, in epoch seconds (from /proc, to 10 ms; else when this module loaded)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        age = float(Path("/proc/uptime").read_text().split()[0]) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError):
        return _LOADED


def held_out_loss(model, spec: dict) -> dict[str, Any]:
    """Return the teacher-forced loss of the trained model on the spec's eval rows (answer tokens incl. end-of-turn)."""
    from peftkit.data.prepare import read_examples
    from peftkit.evaluate import build_cases, teacher_forced
    from peftkit.models import load_tokenizer
    from peftkit.prompting import Prompting

    started = time.perf_counter()
    tokenizer = load_tokenizer(spec["model_dir"])  # peftkit's pad policy; padding is masked here anyway
    examples = read_examples(spec["eval_file"], "chat", {})[0]
    cases = build_cases(tokenizer, examples, Prompting(spec["system_prompt"], None), max_seq_length=spec["max_seq_length"])
    # fp32 for every recipe, so the figure compares the trained weights, not the precision they are scored in.
    scores = teacher_forced(model.float().eval(), cases, pad_id=tokenizer.pad_token_id, batch_size=EVAL_BATCH,
                            desc="held-out loss", progress=False)
    scored = json.dumps([[c.ids, c.labels] for c in cases]).encode()
    return {"eval_loss": scores["loss"], "eval_token_accuracy": scores["token_accuracy"], "eval_tokens": scores["tokens"],
            "eval_rows": len(cases), "eval_rows_sha256": hashlib.sha256(scored).hexdigest(),
            "eval_seconds": time.perf_counter() - started}


def parameters(model) -> dict[str, int]:
    """Return the base model's parameter count (adapters left out) and the trainable count."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"parameters": total - trainable, "trainable_parameters": trainable}


def versions() -> dict[str, str]:
    """Return the versions of the libraries a recipe may train with."""
    out = {}
    for name in ("torch", "transformers", "peft", "trl"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def main(train: Callable[[dict, Meter], Any], argv: list[str] | None = None) -> int:
    """Run one recipe from --spec, write its measurements to --out, return the exit code."""
    import torch

    parser = argparse.ArgumentParser(description="Train one recipe of `peftkit bench train` and measure it.")
    parser.add_argument("--spec", required=True, help="JSON spec written by peftkit.bench.train_bench")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    meter = Meter()
    try:
        model = train(spec, meter)
    except RecipeSkipped as exc:
        atomic.write_json(args.out, {"recipe": spec["recipe"], "status": f"skipped: {exc}"})
        return 0
    result = {"recipe": spec["recipe"], "status": "ok", "dtype": spec["dtype"], **meter.summary(process_started()),
              **parameters(model), "torch_threads": torch.get_num_threads()}
    result.update(held_out_loss(model, spec))
    result["versions"] = versions()
    atomic.write_json(args.out, result)
    return 0
