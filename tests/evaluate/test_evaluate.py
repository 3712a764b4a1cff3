"""`peftkit eval`: base vs adapter on held-out data, scored as training scores, with a forgetting check."""
from __future__ import annotations

import json

import pytest
import torch

from peftkit.cli import main
from peftkit.config import load_config
from peftkit.evaluate import Case, EvalSettings, build_cases, generation_scores, run_eval, teacher_forced
from peftkit.train import train

FAST = EvalSettings(max_new_tokens=8, batch_size=4, limit=6, examples=2, progress=False)


@pytest.fixture
def trained(tiny_overrides, tmp_path):
    """Return a tiny LoRA run folder (6 steps on the colour conversations, 10% held out)."""
    cfg = load_config("configs/demo/fernhill.yaml", tiny_overrides + ["train.learning_rate=0.02"])
    return train(cfg).output_dir


def test_eval_writes_base_and_adapter_side_by_side(trained, chat_file, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(trained), "--data", str(chat_file), "--limit", "6", "--max-new-tokens", "8",
                 "--batch-size", "4", "--examples", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["cases"] == 6 and set(report["scores"]) == {"base", "adapter"}
    for side in ("base", "adapter"):
        s = report["scores"][side]
        assert s["tokens"] > 0 and 0 <= s["token_accuracy"] <= 1 and 0 <= s["rouge_l"] <= 1 and 0 <= s["chrf"] <= 1
    # Six steps at a high rate on a learnable pattern: the adapter's answer loss is well under the base's.
    assert report["scores"]["adapter"]["loss"] < report["scores"]["base"]["loss"] - 0.5
    assert report["difference"]["loss"] == pytest.approx(report["scores"]["adapter"]["loss"] - report["scores"]["base"]["loss"])
    f = report["forgetting"]
    assert f["texts"] == 24 and f["relative_change"] == pytest.approx((f["adapter_loss"] - f["base_loss"]) / f["base_loss"])
    assert len(report["examples"]) == 2 and {"prompt", "reference", "base", "adapter"} <= set(report["examples"][0])
    assert "answer loss" in printed and "difference" in printed and "forgetting check on 24 passages" in printed
    assert "example 1: What colour is item" in printed


def test_default_data_is_the_runs_held_out_split(trained):
    report, path = run_eval(str(trained), settings=EvalSettings(generate=False, forgetting=False, progress=False),
                            out=trained / "eval.json")
    assert report.cases == 5 and "held-out 0.1" in report.data  # round(48 * 0.1) rows held out at training
    assert json.loads(path.read_text())["cases"] == 5


def test_loss_and_accuracy_equal_a_hand_count(tiny_model_dir, bundled_dir):
    """The batched, padded score equals transformers' own loss and a row-by-row argmax count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(bundled_dir)
    torch.manual_seed(0)
    cases = []
    for n in (7, 12, 9):
        ids = torch.randint(5, 1000, (n,)).tolist()
        cases.append(Case("x", ids, [-100] * 3 + ids[3:]))
    got = teacher_forced(model, cases, pad_id=0, batch_size=2, desc="t", progress=False)
    losses, correct, total = [], 0, 0
    for c in cases:
        ids, labels = torch.tensor([c.ids]), torch.tensor([c.labels])
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
        n = int((labels[:, 1:] != -100).sum())
        losses.append(float(out.loss) * n)
        correct += int((out.logits[0, :-1].argmax(-1)[labels[0, 1:] != -100] == labels[0, 1:][labels[0, 1:] != -100]).sum())
        total += n
    assert got["tokens"] == total
    assert got["loss"] == pytest.approx(sum(losses) / total, rel=1e-5)
    assert got["token_accuracy"] == correct / total


def test_cases_are_labelled_as_training_labels_them(bundled_dir):
    from transformers import AutoTokenizer

    from peftkit.data.formats import Example
    from peftkit.prompting import build_prompting

    tok = AutoTokenizer.from_pretrained(bundled_dir)
    prompting = build_prompting(tok, "Be brief.", None)
    chat = Example("f.jsonl:1", messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    [case] = build_cases(tok, [chat], prompting)
    assert case.prompt == [{"role": "user", "content": "Hi"}] and case.reference == "Hello."
    trained = tok.decode([t for t in case.labels if t != -100])
    assert trained.startswith("Hello.") and trained.endswith("<|im_end|>")  # the end-of-turn token is scored
    assert "Be brief." in tok.decode(case.ids)  # the recorded system prompt is part of the prompt


def test_generation_scores_come_from_the_libraries():
    same = generation_scores(["Item 3 is red."], ["Item 3 is red."])
    assert same == {"exact_match": 1.0, "rouge_l": 1.0, "chrf": 1.0}
    other = generation_scores(["zzz qqq"], ["Item 3 is red."])
    assert other["exact_match"] == 0.0 and other["rouge_l"] == 0.0 and other["chrf"] < 0.1
    assert generation_scores([], []) == {"exact_match": None, "rouge_l": None, "chrf": None}


def test_eval_needs_something_to_evaluate(capsys, tmp_path):
    assert main(["eval"]) == 2
    assert "name an adapter" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--batch-size", "0"]) == 2
    assert "--batch-size=0 must be at least 1" in capsys.readouterr().err


def test_training_can_end_with_the_same_evaluation(tiny_overrides, tmp_path):
    cfg = load_config("configs/demo/fernhill.yaml", tiny_overrides + ["eval.generate=true", "eval.max_new_tokens=6",
                                                                           "eval.examples=1"])
    result = train(cfg)
    report = result.metrics["evaluation"]
    assert report["cases"] == 5 and set(report["scores"]) == {"base", "adapter"} and len(report["examples"]) == 1
    assert json.loads((result.output_dir / "metrics.json").read_text())["evaluation"] == json.loads(json.dumps(report))
    card = (result.adapter_dir / "README.md").read_text()
    assert "## Evaluation" in card and "answer token accuracy" in card and "forgetting check" in card


def test_a_full_fine_tunes_base_is_the_base_model_itself(tiny_overrides, chat_file, tmp_path):
    """A full fine-tune has no adapter to switch off: its base column must be the base model's own scores."""
    cfg = load_config("configs/demo/fernhill.yaml", tiny_overrides + ["method.name=full", "train.max_steps=2",
                                                                           "train.learning_rate=0.001"])
    run = train(cfg).output_dir
    settings = EvalSettings(generate=False, forgetting=False, progress=False)
    tuned, _ = run_eval(str(run), data=str(chat_file), settings=settings, dtype="fp32", out=tmp_path / "full.json")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.data.prepare import read_examples
    from peftkit.prompting import read_prompting

    tok = AutoTokenizer.from_pretrained(run / "adapter")
    cases = build_cases(tok, read_examples(str(chat_file), "auto", {})[0], read_prompting(run / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name).eval()
    alone = teacher_forced(base, cases, pad_id=tok.pad_token_id, batch_size=8, desc="", progress=False)
    assert tuned.scores["base"]["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    assert tuned.scores["base"]["tokens"] == alone["tokens"]
    assert abs(tuned.scores["adapter"]["loss"] - tuned.scores["base"]["loss"]) > 1e-3


def test_a_registered_adapters_evaluation_goes_into_its_entry(tiny_overrides, chat_file, tmp_path, peftkit_home, capsys):
    from peftkit.registry import Registry

    cfg = load_config("configs/demo/fernhill.yaml", tiny_overrides + ["registry.register=true", "name=colours"])
    assert train(cfg).registry_ref == "colours@1"
    report, _ = run_eval("colours", data=str(chat_file), settings=EvalSettings(generate=False, forgetting=False,
                                                                             progress=False), out=tmp_path / "e.json")
    stored = Registry().show("colours").metrics["evaluation"]
    assert stored["scores"]["adapter"]["loss"] == pytest.approx(report.scores["adapter"]["loss"])
    assert Registry().show("colours").metrics["eval_loss"] is not None  # the training metrics stay
    assert main(["registry", "show", "colours"]) == 0
    assert f"evaluation: {report.cases} examples of {chat_file}: answer loss" in capsys.readouterr().out
