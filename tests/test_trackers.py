"""Experiment trackers (train.report_to): TensorBoard files in every run, wandb offline, clear errors."""
import json
import os
import socket

import pytest

from peftkit.config import ConfigError, load_config
from peftkit.errors import PeftkitError
from peftkit.progress import tracker_environment, tracking
from peftkit.train import train


def test_tensorboard_events_in_the_run_folder_match_the_logged_losses(tiny_overrides, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(load_config("configs/demo/fernhill.yaml", tiny_overrides))  # report_to's default: tensorboard
    events = result.output_dir / "tensorboard"
    assert list(events.glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    logged = {e.step: e.value for e in accumulator.Scalars("train/loss")}

    history = json.loads((result.output_dir / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    expected = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert sorted(logged) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert all(logged[step] == pytest.approx(expected[step], rel=1e-6) for step in expected)
    assert logged[6] == pytest.approx(result.metrics["train_loss"], rel=1e-6)
    assert all(e.value > 0 for e in accumulator.Scalars("train/tokens_per_second"))
    assert [e.step for e in accumulator.Scalars("eval/loss")][-1] == 6
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # set for the run only


def test_wandb_logs_offline_into_the_run_folder_without_network(tiny_overrides, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any call to the W&B API would fail here
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    connect = socket.socket.connect

    def local_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network connection attempted to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    cfg = load_config("configs/demo/fernhill.yaml", tiny_overrides + ["train.report_to=[wandb]", "train.max_steps=2"])
    result = train(cfg)

    runs = list((result.output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert [p.stat().st_size > 0 for p in runs[0].glob("run-*.wandb")] == [True]
    logs = "".join(p.read_text(errors="replace") for p in (result.output_dir / "wandb").rglob("*.log"))
    assert "127.0.0.1:9" not in logs
    assert wandb.run is None  # finished, so the next train() in this process starts its own run
    assert "WANDB_MODE" not in os.environ and not (result.output_dir / "tensorboard").exists()


def test_mlflow_keeps_training_and_evaluation_in_one_run_in_the_run_folder(tiny_overrides, monkeypatch):
    mlflow = pytest.importorskip("mlflow")  # not in the test extra (heavy); checked where it is installed
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("configs/demo/fernhill.yaml", tiny_overrides + ["train.report_to=[mlflow]", "train.max_steps=2"])
    result = train(cfg)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{result.output_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_name, r.info.status) for r in runs] == [(cfg.name, "FINISHED")]
    losses = [m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert losses == pytest.approx([result.metrics["train_loss_first"], result.metrics["train_loss"]], rel=1e-6)
    assert runs[0].data.metrics["eval_loss"] == pytest.approx(result.metrics["eval_loss"], rel=1e-6)
    assert mlflow.active_run() is None


@pytest.mark.parametrize("value, words", [
    ("[tensorbord]", ["train.report_to=['tensorbord']", "'tensorbord' is not a tracker", "did you mean tensorboard",
                      "choose from tensorboard, wandb, mlflow, trackio, none"]),
    ("[none, wandb]", ["train.report_to=['none', 'wandb']", "mixes none with trackers", "train.report_to=[none]"]),
])
def test_bad_report_to_names_key_value_and_fix(value, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=chat.jsonl", f"train.report_to={value}"])
    assert all(w in str(err.value) for w in words), str(err.value)


def test_missing_tracker_gives_the_pip_line_before_anything_loads(tiny_overrides, tmp_path, monkeypatch):
    import peftkit.models
    import peftkit.progress

    monkeypatch.setattr(peftkit.progress, "tracker_installed", lambda name: name != "mlflow")
    monkeypatch.setattr(peftkit.models, "load_tokenizer", lambda *a, **k: pytest.fail("loaded before the check"))
    cfg = load_config("configs/demo/fernhill.yaml", tiny_overrides + ["train.report_to=[tensorboard, mlflow]"])
    with pytest.raises(PeftkitError, match=r"asks for mlflow, which is not installed; run `pip install mlflow`"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_tracker_settings_stay_in_the_run_folder_unless_the_user_set_them(tmp_path, monkeypatch):
    run = tmp_path / "run"
    env = tracker_environment(["tensorboard", "wandb", "mlflow", "trackio"], run, environ={})
    assert env["TENSORBOARD_LOGGING_DIR"] == str(run / "tensorboard") and env["WANDB_MODE"] == "offline"
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{run / 'mlflow.db'}" and env["TRACKIO_DIR"] == str(run / "trackio")

    user = {"WANDB_API_KEY": "k", "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"}
    env = tracker_environment(["wandb", "mlflow"], run, environ=user)
    assert "WANDB_MODE" not in env and "MLFLOW_TRACKING_URI" not in env  # a key given: wandb syncs as the user asked
    assert tracker_environment(["none"], run, environ={}) == {}

    mine = f"sqlite:///{tmp_path / 'mine.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mine)
    with tracking(["mlflow"], run, main=False):  # main=False: no mlflow run opened (it need not be installed)
        assert os.environ["MLFLOW_TRACKING_URI"] == mine
    with tracking(["tensorboard"], run):
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(run / "tensorboard")
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ and os.environ["MLFLOW_TRACKING_URI"] == mine
