"""train(cfg): base model -> data -> method -> Trainer -> adapter, metrics, plot, registry entry.

Read it top to bottom: `train` is the whole workflow; the helpers below it each do one step.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peftkit import __version__
from peftkit import checkpoints as ckpts
from peftkit.config import RunConfig, config_to_dict, save_config
from peftkit.errors import PeftkitError

log = logging.getLogger(__name__)


# Methods whose trained model is the base forward with modules swapped in, so the loss can call the
# backbone and the vocabulary head separately; prefix and prompt tuning change the inputs instead.
SPARSE_LOGIT_METHODS = ("lora", "dora", "qlora", "ia3", "full")


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    metrics: dict
    registry_ref: str | None = None
    model: object = None
    """The trained model still in memory (for callers that evaluate or compare right away)."""


def train(cfg: RunConfig, *, resume: bool = False, force_resume: bool = False, register: bool | None = None) -> TrainResult:
    """Return the result of training cfg's method on cfg's data; writes the run directory.

    An interrupted run in the same output dir (killed, crashed, or stopped by a signal) is
    resumed automatically from its newest complete checkpoint; resume=True insists on it.
    """
    from transformers import set_seed

    from peftkit.data import build_collator, prepare
    from peftkit.methods import build_method, load_adapter
    from peftkit.models import base_config_dict, load_base, load_tokenizer, resolve_dtype, resolve_model
    from peftkit.trainer import SafeTrainer, StopOnSignal, token_accuracy, token_predictions

    out = Path(cfg.train.output_dir)
    checkpoint_dir = out / "checkpoints"
    main = is_main_process()  # under torchrun/accelerate launch only rank 0 writes the run dir
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpts.recover_swap(out / "adapter")
        ckpts.clean_staging(out)
        ckpts.clean_staging(checkpoint_dir)
    set_seed(cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model.name, cfg.model.revision)
    prepared = prepare(cfg.data, tokenizer, seed=cfg.train.seed)
    base_dir = resolve_model(cfg.model.name, cfg.model.revision)
    state = {"base_fingerprint": base_fingerprint(base_dir), "data_fingerprint": prepared.fingerprint,
             "config": ckpts.flatten(config_to_dict(cfg))}
    start_from = resume_point(out, checkpoint_dir, state, resume=resume, force=force_resume, main=main)
    if main:
        save_config(cfg, out / "config.yaml")
        ckpts.write_run_state(out, status="running", **state)

    model = load_base(cfg.model.name, dtype=cfg.model.dtype, quantize_4bit=cfg.method.name == "qlora",
                      revision=cfg.model.revision, attn_implementation=cfg.model.attn_implementation,
                      trust_remote_code=cfg.model.trust_remote_code)
    if cfg.method.init_from:
        model = load_adapter(model, cfg.method.init_from, is_trainable=True)
    else:
        model = build_method(model, cfg.method)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    stop = ckpts.GracefulStop()
    trainer = SafeTrainer(
        model=model,
        args=training_arguments(cfg, checkpoint_dir, has_eval=prepared.eval is not None,
                                bf16=resolve_dtype(cfg.model.dtype) == torch.bfloat16),
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=build_collator(tokenizer, packing=cfg.data.packing, attn_implementation=cfg.model.attn_implementation),
        processing_class=tokenizer,
        callbacks=[StopOnSignal(stop)],
        compute_metrics=token_accuracy,
        preprocess_logits_for_metrics=token_predictions,
    )
    trainer.sparse_logits = cfg.method.name in SPARSE_LOGIT_METHODS
    started = time.perf_counter()
    with stop:
        trainer.train(resume_from_checkpoint=str(start_from) if start_from else None)
    wall = time.perf_counter() - started
    if stop.requested:
        if main:
            ckpts.write_run_state(out, status="interrupted", step=trainer.state.global_step, **state)
        raise ckpts.TrainingInterrupted(
            f"training stopped by {stop.requested} at step {trainer.state.global_step}; checkpoint saved in "
            f"{ckpts.latest_complete_checkpoint(checkpoint_dir)}. Resume with the same command plus --resume")
    evaluation = trainer.evaluate() if prepared.eval is not None else {}
    eval_loss = evaluation.get("eval_loss")

    metrics = {
        "train_loss": last_logged(trainer.state.log_history, "loss"),
        "train_loss_first": first_logged(trainer.state.log_history, "loss"),
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss) if eval_loss is not None and eval_loss < 50 else None,
        "eval_token_accuracy": evaluation.get("eval_token_accuracy"),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "resumed_from_step": int(start_from.name.split("-")[-1]) if start_from else None,
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
        "data": prepared.stats,
    }
    lineage = {
        "peftkit_version": __version__,
        "method": cfg.method.name,
        "base_model": cfg.model.name,
        "base_fingerprint": state["base_fingerprint"],
        "base_config": base_config_dict(base_dir),
        "data_fingerprint": prepared.fingerprint,
        "config": config_to_dict(cfg),
        "metrics": metrics,
        "parent": cfg.method.init_from,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    adapter_dir = out / "adapter"
    if not main:
        return TrainResult(output_dir=out, adapter_dir=adapter_dir, metrics=metrics, model=model)
    save_adapter(model, tokenizer, adapter_dir, cfg, lineage)
    write_json(out / "metrics.json", metrics)
    plot_losses(trainer.state.log_history, out / "loss.png")
    ckpts.write_run_state(out, status="finished", step=trainer.state.global_step, **state)

    ref = None
    if cfg.registry.register if register is None else register:
        ref = register_run(out, cfg)
    return TrainResult(output_dir=out, adapter_dir=adapter_dir, metrics=metrics, registry_ref=ref, model=model)


def is_main_process() -> bool:
    """Return False on the non-zero ranks of a torchrun / accelerate launch job."""
    return int(os.environ.get("RANK", "0")) == 0


def resume_point(out: Path, checkpoint_dir: Path, state: dict, *, resume: bool, force: bool, main: bool = True) -> Path | None:
    """Return the checkpoint to continue from (None for a fresh start), refusing a resume that changes what is trained."""
    previous = ckpts.read_run_state(out)
    latest = ckpts.latest_complete_checkpoint(checkpoint_dir)
    interrupted = previous is not None and previous.get("status") != "finished" and latest is not None
    if resume and latest is None:
        raise PeftkitError(f"--resume: there is no complete checkpoint in {checkpoint_dir}; run without --resume to start")
    if not (resume or interrupted):
        if main and checkpoint_dir.exists():  # a finished run's checkpoints would confuse a new one
            shutil.rmtree(checkpoint_dir)
        return None
    if previous is not None:
        diffs = ckpts.resume_differences(previous, state)
        if diffs and not force:
            raise ckpts.ResumeMismatch(
                f"cannot resume {out}: this run differs from the interrupted one in " + "; ".join(diffs) +
                ". Restore the original settings, pick a new train.output_dir, or pass --force-resume")
    log.info("resuming from %s%s", latest, "" if resume else " (an interrupted run was found in the output dir)")
    return latest


# ---------------------------------------------------------------- steps

def training_arguments(cfg: RunConfig, checkpoint_dir: Path, *, has_eval: bool, bf16: bool):
    """Return transformers TrainingArguments for the train section."""
    from transformers import TrainingArguments

    t = cfg.train
    eval_strategy = "no" if not has_eval else ("steps" if t.eval_steps > 0 else "epoch")
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5 reads a float < 1 as a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        activation_checkpointing=t.gradient_checkpointing,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps if t.eval_steps > 0 else None,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        seed=t.seed,
        bf16=bf16 and torch.cuda.is_available(),  # on CPU the weights are already bf16; autocast adds copies
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],  # PEFT wrappers hide the label argument from transformers' signature check
        use_cpu=not torch.cuda.is_available(),  # also makes torchrun/accelerate launch on CPUs use gloo DDP
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )


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


def base_fingerprint(base_dir: Path) -> str | None:
    """Return the base model's fingerprint (None if the registry's fingerprint module is absent)."""
    try:
        from peftkit.fingerprint import base_fingerprint as fingerprint
    except ImportError:
        return None
    return fingerprint(base_dir)


def save_adapter(model, tokenizer, target: Path, cfg: RunConfig, lineage: dict) -> Path:
    """Write the adapter, tokenizer, lineage and model card to target atomically; return target."""
    for conf in getattr(model, "peft_config", {}).values():
        conf.base_model_name_or_path = cfg.model.name  # what the user typed, not a cache path

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        write_json(folder / "peftkit.json", lineage)
        (folder / "README.md").write_text(model_card(cfg, lineage), encoding="utf-8")

    return ckpts.write_staged(target, write, what="adapter")


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
            ("peak memory (MiB)", fmt(m["peak_memory_mb"])), ("device / dtype", f"{m['device']} / {m['dtype']}")]
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

## Config
```yaml
{yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip()}
```
"""


def plot_losses(history: list[dict], path: Path) -> None:
    """Draw train and eval loss against steps into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def register_run(out: Path, cfg: RunConfig) -> str | None:
    """Return the registry reference of the run's adapter after adding it (None without a registry)."""
    try:
        from peftkit.registry import Registry
    except ImportError:
        log.warning("the registry is not available in this build; the adapter is only in %s", out / "adapter")
        return None
    try:
        entry = Registry(cfg.registry.path).add(out, name=cfg.name, tags=cfg.registry.tags, domain=cfg.registry.domain)
    except PeftkitError as exc:
        # The adapter is saved already; a registry refusal (say, the name is taken on another base) must not lose it.
        log.warning("the adapter was saved in %s but not registered: %s", out / "adapter", exc)
        return None
    return entry.ref


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
