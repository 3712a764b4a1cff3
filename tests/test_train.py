"""`peftkit train` end to end on the tiny Llama: files written, stock peft loads it, loss goes down, it stops."""
import json

import pytest
import torch
from safetensors import safe_open

from peftkit.cli import main
from peftkit.config import load_config
from peftkit.train import train


def test_train_writes_every_file(tiny_overrides, tmp_path, capsys):
    assert main(["train", "configs/demo/fernhill.yaml", *sum([["--set", o] for o in tiny_overrides], [])]) == 0
    run = tmp_path / "run"
    adapter = run / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "README.md", "peftkit.json"):
        assert (adapter / name).is_file(), name
    assert (adapter / "chat_template.jinja").is_file() or "chat_template" in (adapter / "tokenizer_config.json").read_text()
    for name in ("config.yaml", "metrics.json", "loss.png"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]

    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("train_loss", "eval_loss", "tokens_per_second", "wall_time_s", "trainable_parameters",
                "total_parameters", "peak_memory_mb"):
        assert metrics[key] is not None and metrics[key] > 0, key
    assert metrics["steps"] == 6 and metrics["trainable_parameters"] < metrics["total_parameters"]

    card = (adapter / "README.md").read_text()
    assert "base_model:" in card and "lora" in card and "chat.jsonl" in card and "eval loss" in card
    lineage = json.loads((adapter / "peftkit.json").read_text())
    assert lineage["method"] == "lora" and lineage["data_fingerprint"].startswith("sha256:")
    assert lineage["base_config"]["num_hidden_layers"] == 2
    assert load_config(run / "config.yaml").method.rank == 16  # the resolved config reloads
    assert "adapter:" in capsys.readouterr().out
    # Nothing half-written is left beside the adapter.
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_saved_adapter_loads_in_stock_peft_with_identical_logits(tiny_overrides, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config("configs/demo/fernhill.yaml", tiny_overrides + ["method.target_modules=all-linear"])
    result = train(cfg)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    result.model.eval()
    with torch.no_grad():
        trained = result.model(input_ids=ids).logits
        stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
        loaded = stock.eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
    assert torch.allclose(trained, loaded, atol=1e-6)
    assert not torch.allclose(trained, base, atol=1e-4)  # the adapter really changed the model
    with safe_open(result.adapter_dir / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    assert any("mlp.down_proj.lora_B" in n for n in names) and all(".default." not in n for n in names)


def test_loss_goes_down(tiny_overrides):
    cfg = load_config("configs/demo/fernhill.yaml", tiny_overrides + [
        "train.max_steps=40", "train.learning_rate=0.01", "train.save_steps=100", "data.eval_fraction=0",
        "method.target_modules=all-linear", "method.rank=8"])
    m = train(cfg).metrics
    assert m["train_loss"] < 0.8 * m["train_loss_first"], (m["train_loss_first"], m["train_loss"])
    assert m["eval_loss"] is None


def test_trained_adapter_learns_to_stop(tiny_model_dir, tmp_path):
    """The end-of-turn token is in the loss, so a trained adapter ends its answer instead of running on."""
    from peftkit.generate import generate, load_session

    row = {"messages": [{"role": "user", "content": "Say the code."}, {"role": "assistant", "content": "ALPHA 7"}]}
    data = tmp_path / "one.jsonl"
    data.write_text((json.dumps(row) + "\n") * 32, encoding="utf-8")
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=fp32", f"data.path={data}",
                             "data.eval_fraction=0", "train.max_steps=60", "train.batch_size=8", "train.learning_rate=0.02",
                             "train.warmup_ratio=0", "method.target_modules=all-linear", "train.save_steps=1000",
                             f"train.output_dir={tmp_path / 'run'}", "registry.register=false", "train.logging_steps=10"])
    result = train(cfg)
    session = load_session(str(result.adapter_dir), dtype="fp32")
    [reply] = generate(session, [[{"role": "user", "content": "Say the code."}]], max_new_tokens=20)
    assert reply == "ALPHA 7"
    # It stopped on the end-of-turn token, well before max_new_tokens.
    from peftkit.data import build_prompt_ids

    ids = torch.tensor([build_prompt_ids(session.tokenizer, [{"role": "user", "content": "Say the code."}])])
    out = session.model.generate(input_ids=ids, max_new_tokens=20, do_sample=False, eos_token_id=session.stop_ids,
                                 pad_token_id=session.tokenizer.pad_token_id)
    assert out.shape[1] - ids.shape[1] < 20 and out[0, -1].item() in session.stop_ids


def test_generate_cli_with_and_without_adapter(tiny_overrides, tmp_path, capsys):
    cfg = load_config("configs/demo/fernhill.yaml", tiny_overrides)
    result = train(cfg)
    assert main(["generate", "--adapter", str(result.output_dir), "--prompt", "What colour is item 3?",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["generate", "--base", cfg.model.name, "--prompt", "hi", "--max-new-tokens", "3"]) == 0


def test_chat_streams_and_keeps_history(tiny_overrides, capsys):
    from peftkit.generate import chat_loop, load_session

    result = train(load_config("configs/demo/fernhill.yaml", tiny_overrides))
    session = load_session(str(result.adapter_dir), dtype="fp32")
    inputs = iter(["What colour is item 1?", "And item 2?", "/exit"])
    printed = []
    chat_loop(session, max_new_tokens=4, temperature=0.0, input_fn=lambda _: next(inputs),
              print_fn=lambda *a, **k: printed.append(" ".join(map(str, a))))
    assert sum(p.startswith("assistant>") for p in printed) == 2
    assert capsys.readouterr().out.strip()  # the streamer wrote tokens to stdout as they came


def test_bad_data_path_is_a_one_line_error(tiny_overrides, tmp_path, capsys):
    args = sum([["--set", o] for o in tiny_overrides], []) + ["--set", f"data.path={tmp_path / 'missing.jsonl'}"]
    assert main(["train", "configs/demo/fernhill.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.slow
def test_bundled_model_trains_end_to_end(tmp_path):
    """A few real steps on SmolLM2-135M with the sample data; the adapter loads and answers."""
    from peftkit.generate import generate, load_session

    cfg = load_config("configs/demo/fernhill.yaml", [
        "train.max_steps=3", "train.batch_size=4", "train.save_steps=100", "train.logging_steps=1",
        f"train.output_dir={tmp_path / 'run'}", "registry.register=false"])
    result = train(cfg)
    assert result.metrics["steps"] == 3 and result.metrics["eval_loss"] < 10
    assert 0 < result.metrics["trainable_percent"] < 2  # r=16 on the attention projections: 1.35%
    session = load_session(str(result.adapter_dir))
    [reply] = generate(session, [[{"role": "user", "content": "What are your store hours?"}]], max_new_tokens=16)
    assert reply


def test_training_registers_with_lineage_and_opt_out(tiny_overrides, tmp_path, peftkit_home):
    from peftkit.registry import Registry

    sets = sum([["--set", o] for o in tiny_overrides + ["registry.register=true", "name=colours",
                                                        "registry.tags=[demo]", "registry.domain=retail"]], [])
    assert main(["train", "configs/demo/fernhill.yaml", *sets]) == 0
    assert main(["train", "configs/demo/fernhill.yaml", *sets, "--set", "train.seed=3"]) == 0
    assert main(["train", "configs/demo/fernhill.yaml", *sets, "--set", "train.seed=4", "--no-register"]) == 0
    reg = Registry(peftkit_home / "registry")
    entries = [e for e in reg.list() if e.name == "colours"]
    assert sorted(e.version for e in entries) == [1, 2]
    entry = reg.show("colours")
    assert entry.version == 2 and entry.method == "lora" and entry.domain == "retail"
    detail = entry.to_dict()
    text = json.dumps(detail)
    for word in ("base_fingerprint", "data_fingerprint", "train_loss", "sha256:"):
        assert word in text, word
    assert reg.show("colours:demo").version == 2
    assert (reg.checkout("colours@1") / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_eval_token_accuracy_matches_a_hand_count(tiny_overrides, method):
    """The reported eval token accuracy equals argmax-vs-label counted row by row (prompt tuning adds virtual-token logits)."""
    from peftkit.data import prepare
    from peftkit.models import load_tokenizer

    cfg = load_config("configs/demo/fernhill.yaml", [*tiny_overrides, f"method.name={method}", "data.packing=false",
                                                         "data.eval_fraction=0.3", "method.num_virtual_tokens=4",
                                                         "train.max_steps=25", "train.learning_rate=0.03", "train.save_steps=100"])
    result = train(cfg, register=False)
    reported = result.metrics["eval_token_accuracy"]

    tokenizer = load_tokenizer(cfg.model.name)
    rows = prepare(cfg.data, tokenizer, seed=cfg.train.seed).eval
    model = result.model.eval()
    right = total = 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor(row["labels"])
            logits = model(input_ids=ids).logits[0, -len(labels):]
            predicted, target = logits.argmax(-1)[:-1], labels[1:]
            trained = target != -100
            right += int((predicted[trained] == target[trained]).sum())
            total += int(trained.sum())
    assert total > 0 and 0 < reported <= 1
    assert reported == pytest.approx(right / total, abs=1e-9)
    assert result.metrics["eval_loss"] is not None


@pytest.mark.parametrize("eval_steps", [3, 4])
def test_the_held_out_set_is_evaluated_once_at_the_last_step(tiny_overrides, monkeypatch, eval_steps):
    from peftkit.trainer import SafeTrainer

    calls = []
    evaluate = SafeTrainer.evaluate

    def counted(self, *args, **kwargs):
        out = evaluate(self, *args, **kwargs)
        calls.append((self.state.global_step, out["eval_loss"]))
        return out
    monkeypatch.setattr(SafeTrainer, "evaluate", counted)
    result = train(load_config(None, tiny_overrides + [f"train.eval_steps={eval_steps}"]))
    # Every 3 steps: at 3 and at the last (6), where the Trainer's own evaluation is reused. Every 4: at 4, and at 6
    # once, by peftkit, since the Trainer did not evaluate there.
    assert [step for step, _ in calls] == ([3, 6] if eval_steps == 3 else [4, 6])
    assert result.metrics["eval_loss"] == calls[-1][1]
