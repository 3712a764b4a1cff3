"""`peftkit train` then `peftkit generate` per method family on the tiny Llama: the same path, layout and commands for all."""
from __future__ import annotations

import json

import pytest

from peftkit.cli import main

# One method per family file (lora.py via qlora, prompt.py, ia3.py, bottleneck.py, full.py) and its peft_type;
# a full fine-tune is a whole model folder (config.json + model.safetensors) with no adapter_config.json.
FAMILIES = {"qlora": "LORA", "prefix": "PREFIX_TUNING", "ia3": "IA3", "bottleneck": "PEFTKIT_BOTTLENECK", "full": None}


@pytest.mark.parametrize("name", FAMILIES)
def test_train_save_load_generate_from_the_cli(name, tiny_overrides, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"name: tiny-{name}\n", encoding="utf-8")
    overrides = [o for o in tiny_overrides if not o.startswith(("train.max_steps", "registry.register"))]
    overrides += ["train.max_steps=2", f"method.name={name}", "registry.register=true"]
    assert main(["train", str(config), *sum([["--set", o] for o in overrides], [])]) == 0
    assert f"registered: tiny-{name}@1" in capsys.readouterr().out  # the registry accepts every method's folder
    adapter = tmp_path / "run" / "adapter"
    if FAMILIES[name] is None:
        assert (adapter / "config.json").is_file() and not (adapter / "adapter_config.json").exists()
        assert (adapter / "model.safetensors").stat().st_size > 0
    else:
        assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == FAMILIES[name]
        assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["eval_loss"] > 0
    if name == "full":
        assert metrics["trainable_parameters"] == metrics["total_parameters"]
    else:
        assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"] / 100
    assert main(["generate", "--adapter", str(adapter), "--prompt", "What colour is item 3?", "--max-new-tokens", "4",
                 "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out.strip(), "generate printed no reply"
