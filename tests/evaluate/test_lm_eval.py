"""`peftkit eval --lm-eval`: lm-evaluation-harness on the base and the adapter, side by side, fully offline."""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml

from peftkit.cli import main
from peftkit.errors import PeftkitError

TASKS = Path(__file__).parent / "lm_eval_tasks"
ROWS = [json.loads(line) for line in (TASKS / "peftkit_tiny.jsonl").read_text().splitlines()]


@pytest.fixture
def offline(monkeypatch):
    """Fail any network connection, so a test passes only if lm_eval downloads nothing."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("lm_eval tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def task_dir(tmp_path) -> Path:
    """Return a copy of the shipped task folder whose YAML points at its data by absolute path."""
    config = yaml.safe_load((TASKS / "peftkit_tiny.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(TASKS / "peftkit_tiny.jsonl")
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "peftkit_tiny.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture
def lora(tiny_model_dir, tmp_path) -> Path:
    """Return a LoRA adapter for the tiny model with random, non-zero A and B (it changes the logits)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    generator = torch.Generator().manual_seed(2)  # seed 1 happens to leave all six argmaxes where the base has them
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(tmp_path / "lora")
    return tmp_path / "lora"


def hand_scores(model, tokenizer) -> dict[str, float]:
    """Return acc and acc_norm by argmax of summed continuation log-likelihood, encoded as lm_eval encodes it."""
    acc = acc_norm = 0
    for row in ROWS:
        context = f"Question: {row['question']}\nAnswer:"
        lls = []
        for choice in row["choices"]:
            whole = tokenizer.encode(context + " " + choice)
            start = len(tokenizer.encode(context))  # the continuation is what the whole adds to the context
            with torch.no_grad():
                logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            lls.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(start, len(whole))))
        acc += max(range(len(lls)), key=lls.__getitem__) == row["answer"]
        normed = [ll / len(c) for ll, c in zip(lls, row["choices"])]  # per character of the choice itself
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == row["answer"]
    return {"acc": acc / len(ROWS), "acc_norm": acc_norm / len(ROWS)}


def test_lm_eval_scores_base_and_adapter_as_lm_eval_does(tiny_model_dir, lora, task_dir, offline, tmp_path, capsys):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "lm-eval.json"
    assert main(["eval", str(lora), "--base", str(tiny_model_dir), "--lm-eval", "peftkit_tiny",
                 "--lm-eval-include", str(task_dir), "--batch-size", "4", "--dtype", "fp32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    scores = {(r["task"], r["metric"]): r for r in report["scores"]}
    assert set(scores) == {("peftkit_tiny", "acc"), ("peftkit_tiny", "acc_norm")}
    assert report["lm_eval"]["base"]["n-samples"]["peftkit_tiny"]["effective"] == len(ROWS)

    # The numbers are lm_eval's own: the same as simple_evaluate run on each model by itself.
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    for side, model_args in (("base", f"pretrained={tiny_model_dir},dtype=float32"),
                             ("adapter", f"pretrained={tiny_model_dir},peft={lora},dtype=float32")):
        own = simple_evaluate(model="hf", model_args=model_args, tasks=["peftkit_tiny"], task_manager=manager,
                              device="cpu", batch_size=4, log_samples=False)["results"]["peftkit_tiny"]
        for metric in ("acc", "acc_norm"):
            assert scores[("peftkit_tiny", metric)][side] == pytest.approx(own[f"{metric},none"])

    # ... and an argmax of log-likelihoods counted by hand, on the base and on the base with the adapter.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    by_hand = {"base": hand_scores(base, tokenizer),
               "adapter": hand_scores(PeftModel.from_pretrained(base, lora).eval(), tokenizer)}
    for metric in ("acc", "acc_norm"):
        row = scores[("peftkit_tiny", metric)]
        assert row["base"] == pytest.approx(by_hand["base"][metric])
        assert row["adapter"] == pytest.approx(by_hand["adapter"][metric])
        assert row["difference"] == pytest.approx(row["adapter"] - row["base"])
        assert 0 <= row["base"] <= 1 and 0 <= row["adapter"] <= 1
    assert by_hand["base"] != by_hand["adapter"], "the adapter should change which answers win"

    head = next(line for line in printed.splitlines() if line.startswith("task"))
    assert head.split() == ["task", "metric", "base", "adapter", "delta"]
    assert any(line.split()[:2] == ["peftkit_tiny", "acc"] for line in printed.splitlines())
    assert f"results: {out}" in printed


def test_a_missing_lm_eval_says_how_to_install_it(monkeypatch, lora, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
    assert main(["eval", str(lora), "--lm-eval", "hellaswag"]) == PeftkitError.exit_code
    err = capsys.readouterr().err
    assert "lm-evaluation-harness, which is not installed" in err and 'pip install "peftkit[lm-eval]"' in err


def test_an_unknown_task_is_named_with_how_to_list_tasks(task_dir, offline, capsys):
    from peftkit.lm_harness import load_task_manager

    with pytest.raises(PeftkitError) as caught:
        load_task_manager(["peftkit_tiny", "hellaswg"], str(task_dir))
    message = str(caught.value)
    assert "unknown task 'hellaswg'" in message and "did you mean hellaswag" in message
    assert f"lm-eval ls tasks --include_path {task_dir}" in message
    assert "peftkit_tiny" not in message.split("unknown task")[1].split(";")[0]  # the include folder's task is known
    assert main(["eval", "some-adapter", "--lm-eval", " , "]) == PeftkitError.exit_code
    assert "names no task" in capsys.readouterr().err


def test_what_lm_eval_is_asked_to_load(tmp_path, tiny_model_dir, lora):
    from peftkit.lm_harness import model_args

    assert model_args(lora, tiny_model_dir)["adapter"] == {"pretrained": str(tiny_model_dir), "peft": str(lora),
                                                           "tokenizer": str(tiny_model_dir)}
    full = tmp_path / "full"  # a full fine-tune is a whole model: lm_eval loads it as the model, no peft
    full.mkdir()
    (full / "config.json").write_text("{}")
    (full / "model.safetensors").write_bytes(b"")
    (full / "tokenizer_config.json").write_text("{}")
    sides = model_args(full, tiny_model_dir)
    assert sides["adapter"] == {"pretrained": str(full), "tokenizer": str(full)}
    assert sides["base"] == {"pretrained": str(tiny_model_dir), "tokenizer": str(full)}  # one tokenizer for both
    prefix = tmp_path / "prefix"  # peftkit reads these back itself; lm_eval's peft= would not
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(PeftkitError, match="PREFIX_TUNING adapter is read back by peftkit's own loader"):
        model_args(prefix, tiny_model_dir)
