"""What a run reports while it trains: one clean line per logged step, a progress bar, and experiment trackers.

The Trainer's stock ProgressCallback prints raw log dicts between progress-bar redraws; ProgressLines
replaces it. Trackers are transformers' own integrations (train.report_to): this module checks that
they are installed before a model loads, and keeps them local and offline unless the user's
environment says otherwise. transformers already reports from the main process only.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

from peftkit.errors import PeftkitError

log = logging.getLogger(__name__)

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
"""Tracker name as train.report_to spells it -> the pip package that provides it."""


def active_trackers(report_to: list[str]) -> list[str]:
    """Return the trackers to hand transformers' report_to ([none] gives [])."""
    return [name for name in report_to if name != "none"]


def check_trackers(report_to: list[str]) -> None:
    """Raise a PeftkitError with the pip install line when a tracker in report_to is not installed."""
    missing = [name for name in active_trackers(report_to) if not tracker_installed(name)]
    if missing:
        raise PeftkitError(
            f"train.report_to={report_to!r} asks for {' and '.join(missing)}, which is not installed; run "
            f"`pip install {' '.join(TRACKERS[name] for name in missing)}`, or leave it out of train.report_to")


def tracker_installed(name: str) -> bool:
    """Return whether the package a tracker needs can be imported."""
    return importlib.util.find_spec(name) is not None


def tracker_environment(report_to: list[str], run_dir: Path, environ=os.environ) -> dict[str, str]:
    """Return the variables that keep report_to's trackers in run_dir and offline, less those the user has set."""
    run_dir = Path(run_dir).resolve()
    env = {}
    if "tensorboard" in report_to:
        env["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if "wandb" in report_to:
        env["WANDB_DIR"] = str(run_dir)  # wandb writes its own wandb/ folder there
        env["WANDB_PROJECT"] = "peftkit"
        env["WANDB_QUIET"] = "true"  # no run-history sparklines at the end; where the run went is still said
        if "WANDB_MODE" not in environ and "WANDB_API_KEY" not in environ:
            # No account given: log offline (`wandb sync` uploads later) rather than ask for a login mid-run.
            env["WANDB_MODE"] = "offline"
            env["WANDB_ERROR_REPORTING"] = "false"
    if "mlflow" in report_to:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{run_dir / 'mlflow.db'}"  # MLflow 3.13+ refuses a file store
    if "trackio" in report_to:
        env["TRACKIO_DIR"] = str(run_dir / "trackio")  # read when trackio is first imported
    return {key: value for key, value in env.items() if key not in environ}


@contextmanager
def tracking(report_to: list[str], run_dir: Path, *, run_name: str | None = None, main: bool = True):
    """Within: the trackers log into run_dir (offline by default); tracker runs opened here are closed on the way out."""
    import transformers.integrations.integration_utils  # noqa: F401  (imported before WANDB_MODE is set: it prints then)

    env = tracker_environment(report_to, run_dir)
    before = _open_runs()
    os.environ.update(env)
    try:
        if main and "mlflow" in report_to and "MLFLOW_RUN_ID" not in os.environ:
            # transformers ends the mlflow run it started when training ends, so the evaluation after it
            # would land in a second, randomly named run; a run opened here holds both.
            import mlflow

            if mlflow.active_run() is None:
                mlflow.start_run(run_name=run_name)
        yield
    finally:
        # transformers' callbacks reuse an open wandb/mlflow run, so a second train() in this process
        # (a notebook, peftkit compare) would otherwise log into this one.
        _close_runs_opened_since(before)
        for key in env:
            os.environ.pop(key, None)


def _open_runs() -> dict:
    wandb, mlflow = sys.modules.get("wandb"), sys.modules.get("mlflow")
    return {"wandb": getattr(wandb, "run", None), "mlflow": mlflow.active_run() if mlflow else None}


def _close_runs_opened_since(before: dict) -> None:
    now = _open_runs()
    if now["wandb"] is not None and now["wandb"] is not before["wandb"]:
        sys.modules["wandb"].finish()
    if now["mlflow"] is not None and (before["mlflow"] is None or now["mlflow"].info.run_id != before["mlflow"].info.run_id):
        sys.modules["mlflow"].end_run()


@contextmanager
def quiet_libraries():
    """Within: transformers' info and warnings and libraries' Future/DeprecationWarnings go to the debug log."""
    from transformers.utils import logging as hf_logging

    to_debug = _ToDebug()
    handlers = list(hf_logging.get_logger().handlers)  # transformers' own root handler; it does not propagate
    for handler in handlers:
        handler.addFilter(to_debug)
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (FutureWarning, DeprecationWarning)):  # addressed to library callers, not users
            log.debug("%s:%s: %s: %s", filename, lineno, category.__name__, message)
        else:
            shown(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(to_debug)


class _ToDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # The handler may be shared (pytest adds its own to transformers' logger): pass everyone else's records.
        if record.levelno >= logging.ERROR or not record.name.startswith("transformers"):
            return True
        log.debug("%s: %s", record.name, record.getMessage())
        return False


class ProgressLines(TrainerCallback):
    """Print one aligned line per logged step and evaluation; on a terminal, also a bar with loss, lr and tokens/s."""

    def __init__(self):
        self.bar = None
        self.eval_bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and show_bars(args):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not (state.is_world_process_zero and show_bars(args)) or eval_dataloader is None:
            return
        if self.eval_bar is None:
            try:
                total = len(eval_dataloader)
            except TypeError:  # an iterable dataset has no length
                total = None
            self.eval_bar = tqdm(total=total, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_eval_bar()

    def on_predict(self, args, state, control, **kwargs):
        self._close_eval_bar()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = format_line(logs, state.global_step, state.max_steps)
        if line is None:  # the end-of-training summary and anything else: metrics.json and the CLI report those
            log.debug("trainer log at step %s: %s", state.global_step, logs)
            return
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix_str(format_postfix(logs), refresh=False)
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _close_eval_bar(self):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None


def show_bars(args) -> bool:
    """Return whether to draw progress bars: not when disabled, nor when stderr is a file or a pipe (CI logs)."""
    return not args.disable_tqdm and sys.stderr.isatty()


def format_line(logs: dict, step: int, total: int) -> str | None:
    """Return the console line for a Trainer log of a training step or an evaluation, else None."""
    where = f"{step:>{len(str(total))}}/{total}"
    if "loss" in logs:
        parts = [f"step {where}", f"loss {logs['loss']:.4f}"]
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if "grad_norm" in logs:
            parts.append(f"grad {logs['grad_norm']:.2f}")
        if "tokens_per_second" in logs:
            parts.append(f"{logs['tokens_per_second']:,.0f} tok/s")
        return "  ".join(parts)
    if "eval_loss" in logs:
        parts = [f"eval {where}", f"loss {logs['eval_loss']:.4f}"]
        if "eval_token_accuracy" in logs:
            parts.append(f"token accuracy {100 * logs['eval_token_accuracy']:.1f}%")
        if "eval_runtime" in logs:
            parts.append(f"{logs['eval_runtime']:.1f} s")
        return "  ".join(parts)
    return None


def format_postfix(logs: dict) -> str:
    """Return the progress bar's postfix for a training-step log: loss, learning rate, tokens/s."""
    parts = [f"loss {logs['loss']:.4f}"]
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if "tokens_per_second" in logs:
        parts.append(f"{logs['tokens_per_second']:,.0f} tok/s")
    return ", ".join(parts)
