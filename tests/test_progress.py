"""Training prints one clean line per logged step (no raw log dicts), and a progress bar only on a terminal."""
import logging
import re
import warnings
from types import SimpleNamespace

from peftkit.cli import main
from peftkit.progress import ProgressLines, format_line, quiet_libraries

STEP = re.compile(r"^step +(\d+)/6  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d\d  grad \d+\.\d\d  [\d,]+ tok/s$")
EVAL = re.compile(r"^eval +\d+/6  loss \d+\.\d{4}  token accuracy \d+\.\d%  \d+\.\d s$")


def test_training_prints_aligned_lines_instead_of_log_dicts(tiny_overrides, capfd):
    assert main(["train", "configs/demo/fernhill.yaml", *sum([["--set", o] for o in tiny_overrides], [])]) == 0
    out, err = capfd.readouterr()
    everything = out + err
    assert "{'loss'" not in everything and "{'eval_loss'" not in everything and "{'train_runtime'" not in everything
    lines = out.splitlines()
    assert [int(STEP.match(line)[1]) for line in lines if STEP.match(line)] == [1, 2, 3, 4, 5, 6]
    assert any(EVAL.match(line) for line in lines), out
    assert "PAD/BOS/EOS" not in everything  # transformers' notice about aligning special tokens goes to the debug log
    assert "step/s" not in err  # stderr is not a terminal here: no training bar redrawn between the lines


def test_format_line_for_a_step_and_an_evaluation():
    logs = {"loss": 0.94951, "grad_norm": 4.858, "learning_rate": 1.98e-4, "tokens_per_second": 412.4, "epoch": 0.1}
    assert format_line(logs, 20, 200) == "step  20/200  loss 0.9495  lr 1.98e-04  grad 4.86  412 tok/s"
    evaluation = {"eval_loss": 1.0234, "eval_token_accuracy": 0.4567, "eval_runtime": 3.21, "epoch": 0.1}
    assert format_line(evaluation, 20, 200) == "eval  20/200  loss 1.0234  token accuracy 45.7%  3.2 s"
    assert format_line({"train_runtime": 12.0, "train_loss": 1.1}, 200, 200) is None


def test_progress_bar_shows_loss_lr_and_tokens_per_second_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    args, callback = SimpleNamespace(disable_tqdm=False), ProgressLines()
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=10)
    callback.on_train_begin(args, state, None)
    state.global_step = 3
    callback.on_step_end(args, state, None)
    callback.on_log(args, state, None, logs={"loss": 1.5, "learning_rate": 2e-4, "grad_norm": 1.0, "tokens_per_second": 950.0})
    assert callback.bar.n == 3 and callback.bar.postfix == "loss 1.5000, lr 2.00e-04, 950 tok/s"
    callback.on_train_end(args, state, None)
    assert "step  3/10  loss 1.5000" in capsys.readouterr().out

    disabled = ProgressLines()
    disabled.on_train_begin(SimpleNamespace(disable_tqdm=True), state, None)
    assert disabled.bar is None  # train.disable_tqdm or a non-terminal stderr: the lines alone


def test_library_warnings_go_to_the_debug_log(caplog, capfd):
    from transformers.utils import logging as hf_logging

    with caplog.at_level(logging.DEBUG, logger="peftkit"), quiet_libraries():
        warnings.warn("is_gradient_checkpointing is deprecated", FutureWarning)
        hf_logging.get_logger("transformers.trainer").warning("tokens aligned")
    err = capfd.readouterr().err
    assert "deprecated" not in err and "tokens aligned" not in err
    assert "is_gradient_checkpointing is deprecated" in caplog.text and "tokens aligned" in caplog.text
