"""The vLLM launch built from a registry (what it serves, what it refuses and why), the serve command, TextStream."""
from __future__ import annotations

import json
import shutil

import pytest
from serving_helpers import make_adapter

from peftkit.cli import main
from peftkit.serving.errors import ServingError
from peftkit.serving.stream import TextStream
from peftkit.serving.vllm import build_vllm_launch, plan_for_registry, vllm_problems


@pytest.fixture(scope="module")
def vllm_registry(adapter_dirs, tiny_model_dir, tmp_path_factory):
    """Return a registry with adapters vLLM takes (rank 4, rank 64, tagged) and ones it cannot (DoRA, IA3, bias)."""
    from peftkit.registry import Registry

    root = tmp_path_factory.mktemp("vllm")
    biased = root / "biased"
    shutil.copytree(adapter_dirs["lora2"], biased)
    config = json.loads((biased / "adapter_config.json").read_text())
    (biased / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": False, "bias": "lora_only"}))
    registry = Registry(root / "registry")
    registry.add(adapter_dirs["lora0"], name="small", base_model_dir=tiny_model_dir)
    registry.add(adapter_dirs["lora1"], name="small", tags=["stable"], base_model_dir=tiny_model_dir)
    registry.add(adapter_dirs["lora3"], name="small", base_model_dir=tiny_model_dir)
    registry.add(make_adapter(tiny_model_dir, root / "wide", seed=5, r=64, lora_alpha=64), name="wide", base_model_dir=tiny_model_dir)
    registry.add(adapter_dirs["dora0"], name="dora", base_model_dir=tiny_model_dir)
    registry.add(adapter_dirs["ia3"], name="ia3", base_model_dir=tiny_model_dir)
    registry.add(biased, name="biased", base_model_dir=tiny_model_dir)
    return registry


def test_launch_serves_lora_and_says_why_not_for_the_rest(vllm_registry, tiny_model_dir):
    plan = build_vllm_launch(vllm_registry, str(tiny_model_dir), "tiny", port=9000, max_loras=2)
    served = dict(plan.served)
    # Latest and tagged versions are served; small@1 (neither) is left out unless asked for.
    assert {"small", "small@3", "small@2", "small:stable", "wide", "wide@1"} == set(served)
    assert served["small"] == served["small@3"] != served["small:stable"]
    rejected = dict(plan.rejected)
    assert set(rejected) == {"dora@1", "ia3@1", "biased@1"}
    assert "DoRA" in rejected["dora@1"] and "LoRA adapters only" in rejected["ia3@1"] and "bias" in rejected["biased@1"]
    argv = plan.argv
    assert argv[:3] == ["vllm", "serve", str(tiny_model_dir)] and "--enable-lora" in argv
    assert argv[argv.index("--max-lora-rank") + 1] == "64"  # the smallest vLLM allows that fits rank 64
    assert argv[argv.index("--max-loras") + 1] == "2" and argv[argv.index("--max-cpu-loras") + 1] == "3"
    assert f"small:stable={served['small:stable']}" in argv and "--api-key" not in argv
    assert plan.command().startswith("vllm serve ")


def test_rank_cap_refuses_wider_adapters_and_checks_allowed_values(vllm_registry, tiny_model_dir):
    plan = build_vllm_launch(vllm_registry, str(tiny_model_dir), "tiny", max_lora_rank=8, all_versions=True)
    assert "small@1" in dict(plan.served)
    assert "rank 64 is above the max LoRA rank 8" in dict(plan.rejected)["wide@1"]
    with pytest.raises(ServingError, match="one of 1, 8, 16"):
        build_vllm_launch(vllm_registry, str(tiny_model_dir), "tiny", max_lora_rank=24)


def test_vllm_problems_of_adapter_configs():
    ok = {"peft_type": "LORA", "r": 16, "bias": "none"}
    assert vllm_problems(ok) == []
    assert "modules_to_save" in vllm_problems({**ok, "modules_to_save": ["lm_head"]})[0]
    assert "changes the base weights" in vllm_problems({**ok, "init_lora_weights": "pissa_niter_4"})[0]
    assert "rank 1024" in vllm_problems({**ok, "rank_pattern": {"q_proj": 1024}})[0]
    assert vllm_problems({"peft_type": "PREFIX_TUNING"})[0].startswith("peft_type 'PREFIX_TUNING'")


def test_plan_for_another_base_refuses_its_adapters(vllm_registry, bundled_dir):
    plan = plan_for_registry(str(bundled_dir), str(vllm_registry.path))
    assert plan.served == [] and all("another base" in why or "LoRA adapters only" in why for _, why in plan.rejected)


def test_serve_vllm_command_prints_the_launch(vllm_registry, tiny_model_dir, capsys):
    assert main(["serve", "--engine", "vllm", "--base", str(tiny_model_dir), "--registry", str(vllm_registry.path),
                 "--api-key", "k"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("vllm serve ") and "--lora-modules" in out and "k" not in out.split()
    assert "not served by vLLM: dora@1: DoRA" in err and "VLLM_API_KEY" in err


def test_serve_refuses_to_listen_beyond_loopback_without_a_key(capsys, monkeypatch):
    monkeypatch.delenv("PEFTKIT_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--engine", "vllm"]) == 2
    assert "without an API key" in capsys.readouterr().err


def test_serve_options_are_the_settings_fields_with_their_docs_as_help(capsys, monkeypatch):
    from peftkit.cli import build_parser
    from peftkit.cli.serve_cmds import settings_from
    from peftkit.config import field_docs
    from peftkit.serving.settings import ServeSettings

    monkeypatch.setenv("PEFTKIT_API_KEY", "from-env")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines: compare without whitespace
    for name, doc in field_docs(ServeSettings).items():
        flag = "--no-mix" if name == "mix" else "--" + name.replace("_", "-")
        assert flag in help_text and "".join(doc.rstrip(".").split()) in help_text, name
    settings = settings_from(build_parser().parse_args(["serve", "--no-mix", "--max-batch-size", "3", "--dtype", "fp32"]))
    assert (settings.mix, settings.max_batch_size, settings.dtype, settings.api_key) == (False, 3, "fp32", "from-env")
    assert "from-env" not in repr(settings)


def test_text_stream_holds_back_stop_prefixes_and_cuts_at_the_stop(tokenizer):
    stream = TextStream(tokenizer, stops=["END", "\n\n"])
    pieces, stopped = [], False
    for token in tokenizer("Hello world, bye. ENDING")["input_ids"]:
        piece, stopped = stream.push(token)
        pieces.append(piece)
        if stopped:
            break
    assert stopped and "".join(pieces) == "Hello world, bye. "
    assert not any("E" in p for p in pieces)  # never a piece of the stop string
    partial = TextStream(tokenizer, stops=["END"])
    released = "".join(partial.push(t)[0] for t in tokenizer("ok EN")["input_ids"])
    assert released == "ok " and partial.flush() == "EN"
