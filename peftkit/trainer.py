"""The transformers Trainer with crash-safe checkpoints, a token count, and a graceful-stop callback."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from peftkit.atomic import fsync_dir, fsync_tree, is_disk_full
from peftkit.checkpoints import MARKER, DiskFullError, complete_checkpoints
from peftkit.chunked_loss import linear_cross_entropy


class SafeTrainer(Trainer):
    """Trainer whose checkpoints appear only when complete: staged, fsynced, stamped, renamed."""

    _staging_root: Path | None = None
    tokens_seen: int = 0
    """Real (non-pad) tokens fed to training steps, for tokens-per-second."""
    _rate_mark: tuple[float, int] | None = None
    """(time, tokens_seen) when the last training loss was logged, for the tokens/s of each logged interval."""

    def __init__(self, *args, sparse_logits: bool = False, **kwargs):
        """sparse_logits: project to the vocabulary only where a label is trained (for methods that keep the base forward)."""
        super().__init__(*args, **kwargs)
        self.sparse_logits = sparse_logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The vocabulary projection and its log-softmax are about a fifth of a small model's step, and
        # chat data trains on well under half of its tokens: skip the rows of logits nobody learns from.
        # A DDP/FSDP wrapper must run its own forward (it syncs gradients there), so wrapped models take the stock path;
        # FSDP2 shards the model in place (no wrapper), and its root forward is what gathers the head and embeddings.
        wrapped = model is not self.accelerator.unwrap_model(model) or self.is_fsdp_enabled
        if return_outputs or not self.sparse_logits or wrapped or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        hidden = lm.model(**inputs).last_hidden_state
        targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]  # position t predicts token t+1
        keep = targets != -100
        head = lm.lm_head
        if type(head) is torch.nn.Linear and head.bias is None:  # a plain head: project and score chunk by chunk
            loss = linear_cross_entropy(hidden[keep].to(head.weight.dtype), head.weight, targets[keep])
        else:
            loss = torch.nn.functional.cross_entropy(head(hidden[keep]).float(), targets[keep], reduction="sum")
        if num_items_in_batch is None:
            return loss / keep.sum().clamp(min=1)
        # Same scaling as the stock path: num_items_in_batch counts tokens across devices and accumulation steps.
        scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return loss / num_items_in_batch * scale

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._rate_mark is None:
            self._rate_mark = (time.perf_counter(), self.tokens_seen)
        ids = inputs["input_ids"]
        pad = getattr(self.processing_class, "pad_token_id", None)
        self.tokens_seen += int((ids != pad).sum()) if pad is not None else ids.numel()
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Tokens/s since the previous loss log, from the same count as metrics.json: the console line and the trackers show it.
        if "loss" in logs and self._rate_mark is not None:
            now, (then, tokens) = time.perf_counter(), self._rate_mark
            if now > then:
                logs["tokens_per_second"] = (self.tokens_seen - tokens) / (now - then)
            self._rate_mark = (now, self.tokens_seen)
        super().log(logs, start_time)

    def _get_output_dir(self, trial):
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        main = self.args.should_save
        # One staging folder per step, shared by all ranks: under `accelerate launch` every rank writes
        # its own RNG state into the checkpoint, and only the main process stamps and renames it.
        self._staging_root = run_dir / f".staging-{self.state.global_step}"
        if main:
            shutil.rmtree(self._staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)  # writes into the staging root, not the run dir
            if self.state.best_global_step:  # the best checkpoint by its published name, not the staging one
                self.state.best_model_checkpoint = str(run_dir / f"checkpoint-{self.state.best_global_step}")
                if main:
                    self.state.save_to_json(str(self._staging_root / name / "trainer_state.json"))
            self.accelerator.wait_for_everyone()
            if main:
                self._publish(self._staging_root / name, run_dir / name)
        except Exception as exc:
            if is_disk_full(exc):
                raise DiskFullError(
                    f"no space left on the disk while saving {run_dir / name}; the previous checkpoints and the adapter "
                    f"are intact. Free some space and run the same command with --resume") from None
            raise
        finally:
            if main:
                shutil.rmtree(self._staging_root, ignore_errors=True)
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if main:
            self._rotate(run_dir)

    def _publish(self, staged: Path, final: Path) -> None:
        pause = float(os.environ.get("PEFTKIT_FAULT_SAVE_PAUSE", "0"))  # fault-injection hook for kill tests
        if pause:
            time.sleep(pause)
        (staged / MARKER).write_text(json.dumps({"step": self.state.global_step, "saved_at": time.time()}))
        fsync_tree(staged)
        if final.exists():  # re-saving a step after a resume: hide the old copy first
            _remove(final)
        os.rename(staged, final)
        fsync_dir(final.parent)

    def _rotate(self, run_dir: Path) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        best = self.state.best_global_step  # train.early_stopping puts it back at the end: never rotated away
        for old in complete_checkpoints(run_dir)[:-limit]:
            if not best or old.name != f"checkpoint-{best}":
                _remove(old)


def token_predictions(logits, labels):
    """Reduce eval logits to the predicted token ids, so evaluation keeps (batch, length) ints, not vocab-wide rows."""
    if isinstance(logits, tuple):
        logits = logits[0]
    # Prompt tuning returns logits for its virtual tokens too, in front of the real ones.
    return logits[:, -labels.shape[1]:].argmax(-1)


def token_accuracy(prediction) -> dict:
    """Share of trained eval tokens whose top-1 prediction is the reference token (eval loss's plain-language twin)."""
    predicted, labels = prediction.predictions, prediction.label_ids
    predicted, labels = predicted[:, :-1], labels[:, 1:]  # position t predicts token t+1
    trained = labels != -100
    total = int(trained.sum())
    return {"token_accuracy": float((predicted[trained] == labels[trained]).sum() / total) if total else 0.0}


def _remove(folder: Path) -> None:
    # Rename first so a kill during the delete never leaves a half-deleted folder that still looks complete.
    hidden = folder.with_name(f".deleting-{folder.name}-{os.getpid()}")
    os.rename(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


class StopOnSignal(TrainerCallback):
    """After a SIGINT/SIGTERM, save a checkpoint at the end of the current step and stop."""

    def __init__(self, stop):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.requested:
            control.should_save = True
            control.should_training_stop = True
        return control
