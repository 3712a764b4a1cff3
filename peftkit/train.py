"""train(cfg): base model -> data -> method -> Trainer -> adapter, metrics, plot, registry entry.

Read it top to bottom: `train` is the whole workflow; the helpers below it each do one step.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peftkit import atomic
from peftkit import checkpoints as ckpts
from peftkit.config import RunConfig, config_to_dict, save_config
from peftkit.distributed import gather_adapter_state, is_main_process, trainer_device_arguments
from peftkit.errors import PeftkitError
from peftkit.fingerprint import base_fingerprint
from peftkit.lineage import build_lineage, count_parameters, model_card, plot_losses, run_metrics
from peftkit.methods.catalog import CATALOG
from peftkit.models import base_config_dict
from peftkit.packed_attention import packed_attention
from peftkit.prompting import LINEAGE_FILE, build_prompting

log = logging.getLogger(__name__)


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

    from peftkit.data import prepare
    from peftkit.models import load_tokenizer, resolve_model
    from peftkit.progress import check_trackers, quiet_libraries, tracking

    check_trackers(cfg.train.report_to)  # before minutes go into loading data and a model
    out = Path(cfg.train.output_dir)
    checkpoint_dir = out / "checkpoints"
    main = is_main_process()  # under torchrun/accelerate launch only rank 0 writes the run dir
    if main:
        open_run_dir(out, checkpoint_dir)
    set_seed(cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model.name, cfg.model.revision, offline=cfg.model.offline)
    prepared = prepare(cfg.data, tokenizer, seed=cfg.train.seed)
    base_dir = resolve_model(cfg.model.name, cfg.model.revision, offline=cfg.model.offline)
    state = {"base_fingerprint": base_fingerprint(base_dir), "data_fingerprint": prepared.fingerprint,
             "config": ckpts.flatten(config_to_dict(cfg))}
    previous = ckpts.read_run_state(out)
    start_from = resume_point(out, checkpoint_dir, state, resume=resume, force=force_resume, main=main)
    if cfg.train.early_stopping and prepared.eval is None:
        raise PeftkitError(f"train.early_stopping={cfg.train.early_stopping} needs an eval split: set data.eval_path, "
                           "or data.eval_fraction=0.1 to hold out a tenth of the rows, or train.early_stopping=0")
    if main:
        save_config(cfg, out / "config.yaml")
        ckpts.write_run_state(out, status="running", **state)

    # Trackers read their settings from the environment when the Trainer is built and when they log.
    with quiet_libraries(), tracking(cfg.train.report_to, out, run_name=cfg.name, main=main):
        model = build_model(cfg)
        stop = ckpts.GracefulStop()
        trainer = build_trainer(cfg, model, tokenizer, prepared, checkpoint_dir, stop)
        with stop, packed_attention(model, cfg.data.packing):
            search = learning_rate(cfg, trainer, model, prepared, previous if start_from else None, main=main)
            if search is not None:
                state["learning_rate_search"] = search.to_dict()  # kept in run.json, so a resume reuses the rate
                if main:
                    ckpts.write_run_state(out, status="running", **state)
            started = time.perf_counter()
            trainer.train(resume_from_checkpoint=str(start_from) if start_from else None)
            wall = time.perf_counter() - started
            evaluation, stopping = held_out_result(trainer, checkpoint_dir, cfg.train.early_stopping) \
                if prepared.eval is not None and not stop.requested else ({}, None)
    if stop.requested:
        if main:
            ckpts.write_run_state(out, status="interrupted", step=trainer.state.global_step, **state)
        raise ckpts.TrainingInterrupted(
            f"training stopped by {stop.requested} at step {trainer.state.global_step}; checkpoint saved in "
            f"{ckpts.latest_complete_checkpoint(checkpoint_dir)}. Resume with the same command plus --resume")

    metrics = run_metrics(cfg, trainer, model, evaluation, wall=wall, start_from=start_from, data_stats=prepared.stats,
                          search=search, stopping=stopping)
    adapter_dir = out / "adapter"
    weights = gather_adapter_state(trainer)  # every rank takes part: an FSDP/ZeRO-3 model is sharded across them
    if not main:
        return TrainResult(output_dir=out, adapter_dir=adapter_dir, metrics=metrics, model=model)
    save_run(cfg, out, model, tokenizer, trainer, metrics, state, base_dir=base_dir, has_eval=prepared.eval is not None,
             weights=weights)
    ref = None
    if cfg.registry.register if register is None else register:
        ref = register_run(out, cfg)
    return TrainResult(output_dir=out, adapter_dir=adapter_dir, metrics=metrics, registry_ref=ref, model=model)


def learning_rate(cfg: RunConfig, trainer, model, prepared, previous: dict | None, *, main: bool):
    """Set the trainer's rate for train.learning_rate=auto and return the range test behind it (None for a fixed rate).

    A resumed run keeps the rate its start chose (from run.json) instead of searching again."""
    from peftkit.lr_finder import AUTO, RateSearch, find_learning_rate, plot_search

    if cfg.train.learning_rate != AUTO:
        return None
    if previous and previous.get("learning_rate_search"):
        search = RateSearch.from_dict(previous["learning_rate_search"])
        log.info("learning rate: auto, kept from the interrupted run's start: %.3g", search.chosen)
    else:
        search = find_learning_rate(trainer, model, prepared.train, trainer.data_collator,
                                    bounds=CATALOG[cfg.method.name].lr_bounds,
                                    planned_rows=planned_rows(cfg, len(prepared.train), trainer.args.world_size),
                                    seed=cfg.train.seed)
        if main:
            print(search.summary(), flush=True)
            plot_search(search, Path(cfg.train.output_dir) / "lr_search.png")
    trainer.args.learning_rate = search.chosen
    return search


def planned_rows(cfg: RunConfig, rows: int, world_size: int) -> int:
    """Return the rows one process will feed its model over the whole run, of the rows training has (the range
    test's budget)."""
    t = cfg.train
    per_step = t.batch_size * t.gradient_accumulation_steps
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * math.ceil(rows / (per_step * world_size)))
    return steps * per_step


def held_out_result(trainer, checkpoint_dir: Path, patience: int) -> tuple[dict, dict | None]:
    """Return the eval metrics the adapter is reported with, and train.early_stopping's record (None when off)."""
    evaluation = final_evaluation(trainer)
    if not patience:
        return evaluation, None
    stopping = keep_best(trainer, evaluation, checkpoint_dir, patience)
    return stopping.pop("evaluation"), stopping


def keep_best(trainer, evaluation: dict, checkpoint_dir: Path, patience: int) -> dict:
    """Put the best evaluation's weights back into the model when a later one was worse (train.early_stopping);
    return what metrics.json records, with the best evaluation's metrics under "evaluation"."""
    state = trainer.state
    best_step, best_loss = state.best_global_step, state.best_metric
    record = {"patience": patience, "stopped_at_step": state.global_step, "stopped_early": state.global_step < state.max_steps}
    if not best_step or best_loss is None or evaluation["eval_loss"] <= best_loss:
        return {**record, "best_step": state.global_step, "best_eval_loss": evaluation["eval_loss"], "evaluation": evaluation}
    trainer._load_from_checkpoint(str(checkpoint_dir / f"checkpoint-{best_step}"))  # what resume loads weights with
    log.info("early stopping: kept step %d (eval loss %.4f) over step %d (%.4f)", best_step, best_loss,
             state.global_step, evaluation["eval_loss"])
    return {**record, "best_step": best_step, "best_eval_loss": best_loss,
            "evaluation": logged_evaluation(trainer, best_step)}


def final_evaluation(trainer) -> dict:
    """Return the eval metrics at the last step: the Trainer's own when it evaluated there (the end of the last epoch,
    or an eval_steps multiple), else a fresh evaluation (evaluating twice costs a pass and prints twice)."""
    return logged_evaluation(trainer, trainer.state.global_step) or trainer.evaluate()


def logged_evaluation(trainer, step: int) -> dict | None:
    """Return the eval metrics the Trainer logged at step (its last evaluation there), or None."""
    entry = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e and e.get("step") == step), None)
    return {key: value for key, value in entry.items() if key.startswith("eval_")} if entry is not None else None


def open_run_dir(out: Path, checkpoint_dir: Path) -> None:
    """Create the run dir, finishing or cleaning up what a killed earlier run left half-done."""
    out.mkdir(parents=True, exist_ok=True)
    atomic.recover_swap(out / "adapter")
    ckpts.clean_staging(out)
    ckpts.clean_staging(checkpoint_dir)


def save_run(cfg: RunConfig, out: Path, model, tokenizer, trainer, metrics: dict, state: dict, *, base_dir: Path,
             has_eval: bool, weights: dict | None = None) -> None:
    """Write the adapter (lineage, prompting record, model card), metrics.json, loss.png and the finished state.

    weights: the gathered tensors of a sharded model (None: the model holds them whole).
    """
    prompting = build_prompting(tokenizer, cfg.data.system_prompt, cfg.data.chat_template)
    if cfg.eval.generate and has_eval:
        metrics["evaluation"] = evaluate_trained(cfg, model, tokenizer, prompting)
    lineage = build_lineage(cfg, state, metrics, base_config=base_config_dict(base_dir), prompting=prompting)
    save_adapter(model, tokenizer, out / "adapter", cfg, lineage, weights=weights)
    atomic.write_json(out / "metrics.json", metrics)
    plot_losses(trainer.state.log_history, out / "loss.png")
    ckpts.write_run_state(out, status="finished", step=trainer.state.global_step, **state)


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

def evaluate_trained(cfg: RunConfig, model, tokenizer, prompting) -> dict:
    """Return `peftkit eval`'s report for the model just trained, on the run's eval split."""
    from peftkit.data.prepare import held_out_examples, read_examples
    from peftkit.evaluate import EvalSettings, build_cases, evaluate_session
    from peftkit.generate import Session
    from peftkit.prompting import stop_ids

    d = cfg.data
    examples = read_examples(d.eval_path, d.format, dict(d.columns))[0] if d.eval_path else held_out_examples(d, cfg.train.seed)
    session = Session(model.eval(), tokenizer, cfg.model.name, adapter=cfg.name, system_prompt=prompting.system_prompt,
                      chat_template=prompting.chat_template, stop_ids=stop_ids(tokenizer, prompting))
    settings = EvalSettings(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.train.batch_size,
                            examples=cfg.eval.examples)
    cases = build_cases(tokenizer, examples, prompting, max_seq_length=d.max_seq_length)
    return evaluate_session(session, cases, data=d.eval_path or "the eval split", settings=settings).to_dict()


def build_model(cfg: RunConfig):
    """Return the base model wrapped for training with cfg's method (or continuing from method.init_from)."""
    from peftkit.methods import build_method, load_adapter
    from peftkit.models import load_base

    model = load_base(cfg.model.name, dtype=cfg.model.dtype, quantize_4bit=CATALOG[cfg.method.name].quantized_base,
                      revision=cfg.model.revision, attn_implementation=cfg.model.attn_implementation,
                      trust_remote_code=cfg.model.trust_remote_code, offline=cfg.model.offline)
    if cfg.method.init_from:
        model = load_adapter(model, cfg.method.init_from, is_trainable=True)
    else:
        model = build_method(model, cfg.method)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()
    if cfg.train.compile:
        from peftkit.compiling import compile_layers

        compile_layers(model)
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def build_trainer(cfg: RunConfig, model, tokenizer, prepared, checkpoint_dir: Path, stop):
    """Return the SafeTrainer for the model and prepared data, stopping gracefully on stop's signals."""
    from transformers import PrinterCallback, ProgressCallback
    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK

    from peftkit.data import build_collator
    from peftkit.models import resolve_dtype
    from peftkit.progress import ProgressLines
    from peftkit.trainer import SafeTrainer, StopOnSignal, token_accuracy, token_predictions

    trainer = SafeTrainer(
        model=model,
        args=training_arguments(cfg, checkpoint_dir, has_eval=prepared.eval is not None,
                                bf16=resolve_dtype(cfg.model.dtype) == torch.bfloat16),
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=build_collator(tokenizer, packing=cfg.data.packing, attn_implementation=cfg.model.attn_implementation),
        processing_class=tokenizer,
        callbacks=[StopOnSignal(stop), ProgressLines(), *early_stopping_callbacks(cfg.train.early_stopping)],
        compute_metrics=token_accuracy,
        preprocess_logits_for_metrics=token_predictions,
        # Methods that keep the base forward let the loss call the backbone and the vocabulary head separately.
        sparse_logits=CATALOG[cfg.method.name].keeps_base_forward,
    )
    for stock in {ProgressCallback, PrinterCallback, DEFAULT_PROGRESS_CALLBACK}:  # they print raw log dicts
        trainer.remove_callback(stock)
    return trainer


def early_stopping_callbacks(patience: int) -> list:
    """Return the callbacks of train.early_stopping: transformers' patience counter, and a checkpoint at every
    evaluation (so the best one can be put back at the end; SafeTrainer's rotation never deletes it)."""
    if not patience:
        return []
    from transformers import EarlyStoppingCallback, TrainerCallback

    class Stopping(EarlyStoppingCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            pass  # its checks ask for load_best_model_at_end, which peftkit's keep_best replaces

    class SaveAtEvaluation(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            control.should_save = True  # saved right after, at the same step

    return [Stopping(early_stopping_patience=patience), SaveAtEvaluation()]


def training_arguments(cfg: RunConfig, checkpoint_dir: Path, *, has_eval: bool, bf16: bool):
    """Return transformers TrainingArguments for the train section."""
    from transformers import TrainingArguments

    from peftkit.progress import active_trackers

    t = cfg.train
    eval_strategy = "no" if not has_eval else ("steps" if t.eval_steps > 0 else "epoch")
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        # auto: a placeholder until the range test sets args.learning_rate (peftkit.lr_finder)
        learning_rate=CATALOG[cfg.method.name].lr_bounds[0] if t.learning_rate == "auto" else t.learning_rate,
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
        metric_for_best_model="eval_loss" if t.early_stopping and has_eval else None,
        greater_is_better=False if t.early_stopping and has_eval else None,
        restore_callback_states_from_checkpoint=bool(t.early_stopping),  # the patience count survives a resume
        seed=t.seed,
        bf16=bf16 and torch.cuda.is_available(),  # on CPU the weights are already bf16; autocast adds copies
        report_to=active_trackers(t.report_to),  # the environment set by progress.tracking says where they write
        run_name=cfg.name,
        project="peftkit",  # trackio's project
        remove_unused_columns=False,
        label_names=["labels"],  # PEFT wrappers hide the label argument from transformers' signature check
        **trainer_device_arguments(torch.cuda.is_available()),  # gloo on CPUs, also under DeepSpeed
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )


def save_adapter(model, tokenizer, target: Path, cfg: RunConfig, lineage: dict, weights: dict | None = None) -> Path:
    """Write the adapter, tokenizer, lineage and model card to target atomically; return target."""
    for conf in getattr(model, "peft_config", {}).values():
        conf.base_model_name_or_path = cfg.model.name  # what the user typed, not a cache path

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True, **({"state_dict": weights} if weights is not None else {}))
        tokenizer.save_pretrained(folder)
        atomic.write_json(folder / LINEAGE_FILE, lineage)
        (folder / "README.md").write_text(model_card(cfg, lineage), encoding="utf-8")

    return ckpts.write_staged(target, write, what="adapter")


def register_run(out: Path, cfg: RunConfig) -> str | None:
    """Return the registry reference of the run's adapter after adding it (None without a registry)."""
    from peftkit.registry import Registry

    try:
        entry = Registry(cfg.registry.path).add(out, name=cfg.name, tags=cfg.registry.tags, domain=cfg.registry.domain)
    except PeftkitError as exc:
        # The adapter is saved already; a registry refusal (say, the name is taken on another base) must not lose it.
        log.warning("the adapter was saved in %s but not registered: %s", out / "adapter", exc)
        return None
    return entry.ref
