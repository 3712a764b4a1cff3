"""peftkit mix: LoRA adapters of one base combine as peft combines them, and the mix registers with its parents named."""
from __future__ import annotations

import json

import pytest

from peftkit.mix import MixError, mix, parse_weights


def peft_reference(tiny_model_dir, parents, weights, combination):
    """Return peft's own add_weighted_adapter result in memory, built without peftkit.mix."""
    from peft import PeftModel

    from peftkit.models import load_base

    model = PeftModel.from_pretrained(load_base(str(tiny_model_dir), dtype="fp32"), str(parents[0]), adapter_name="a")
    model.load_adapter(str(parents[1]), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "ab", combination_type=combination)
    model.set_adapter("ab")
    return model


def logits(model, session):
    from peftkit.merge import logits_for, sample_prompts

    return logits_for(model, sample_prompts(session.tokenizer, session.system_prompt, session.chat_template))


def distance_to_parent(parent, folder, weights, combination) -> float:
    """Return how far the mix of an adapter with itself lies from that adapter, as a fraction of the logit scale."""
    from peftkit.generate import load_session
    from peftkit.merge import compare

    mix([str(parent), str(parent)], weights, name="self", combination=combination, out=folder, register=False,
        log=lambda _: None)
    original, mixed = load_session(str(parent), dtype="fp32"), load_session(str(folder), dtype="fp32")
    return compare(logits(original.model, original), logits(mixed.model, mixed), 1e-4).relative


def test_linear_mix_equals_pefts_own_and_registers_with_its_parents(make_adapter, tiny_model_dir, tmp_path):
    from peftkit.generate import load_session
    from peftkit.merge import compare
    from peftkit.registry import Registry

    parents = [make_adapter("lora", seed=1), make_adapter("lora", seed=2)]
    registry = tmp_path / "registry"
    result = mix([str(p) for p in parents], [0.5, 0.5], name="blend", combination="linear", out=tmp_path / "blend",
                 registry=str(registry), log=lambda _: None)
    assert result.registry_ref == "blend@1" and result.diff.relative <= 1e-4
    mixed = load_session("blend@1", registry=str(registry), dtype="fp32")
    expected = logits(peft_reference(tiny_model_dir, parents, [0.5, 0.5], "linear"), mixed)
    assert compare(expected, logits(mixed.model, mixed), 1e-5).relative < 1e-5
    lineage = json.loads((tmp_path / "blend" / "peftkit.json").read_text())
    assert lineage["mix"]["parents"] == [{"ref": str(parents[0]), "weight": 0.5}, {"ref": str(parents[1]), "weight": 0.5}]
    assert lineage["mix"]["combination"] == "linear" and lineage["method"] == "lora"
    assert Registry(registry).show("blend@1").lineage["mix"]["parents"][1]["weight"] == 0.5


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_cat_mix_is_exactly_the_weighted_sum_of_the_updates(make_adapter, tmp_path, rslora):
    """cat of an adapter with itself at 0.5 + 0.5 is that adapter: also for rsLoRA, whose scale peft's mix gets wrong."""
    parent = make_adapter("lora", seed=3, use_rslora=rslora)
    assert distance_to_parent(parent, tmp_path / "same", [0.5, 0.5], "cat") < 1e-4
    config = json.loads((tmp_path / "same" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["use_rslora"] is False


def test_linear_mix_of_an_adapter_with_itself_doubles_it_as_peft_defines(make_adapter, tmp_path):
    """Documented in docs/merge.md: linear mixes A and B separately, so w = 0.5 + 0.5 gives 2x the update."""
    parent = make_adapter("lora", seed=4)
    assert distance_to_parent(parent, tmp_path / "quarter", [0.25, 0.25], "linear") < 1e-4  # (2 * sqrt(0.25))^2 = 1
    assert distance_to_parent(parent, tmp_path / "half", [0.5, 0.5], "linear") > 1e-2


def test_adapters_of_other_bases_or_methods_are_refused(make_adapter, tmp_path, tokenizer, bundled_dir):
    import shutil

    lora = make_adapter("lora", seed=1)
    other = tmp_path / "other-base"
    shutil.copytree(lora, other)
    lineage = json.loads((other / "peftkit.json").read_text())
    (other / "peftkit.json").write_text(json.dumps({**lineage, "base_model": "elsewhere", "base_fingerprint": "sha256:" + "0" * 64}))
    with pytest.raises(MixError, match="trained on different bases"):
        mix([str(lora), str(other)], [0.5, 0.5], name="x", register=False, log=lambda _: None)
    with pytest.raises(MixError, match="is a ia3 adapter; mix combines LoRA adapters"):
        mix([str(lora), str(make_adapter("ia3"))], [0.5, 0.5], name="x", register=False, log=lambda _: None)
    with pytest.raises(MixError, match="is a dora adapter"):
        mix([str(lora), str(make_adapter("dora"))], [0.5, 0.5], name="x", register=False, log=lambda _: None)


def test_different_prompting_is_refused_unless_forced(make_adapter, tmp_path):
    a = make_adapter("lora", seed=1)
    b = make_adapter("lora", seed=2, system="You answer in French.")
    with pytest.raises(MixError, match="another system_prompt than .*--force"):
        mix([str(a), str(b)], [0.5, 0.5], name="x", out=tmp_path / "x", register=False, log=lambda _: None)
    mix([str(a), str(b)], [0.5, 0.5], name="x", out=tmp_path / "x", register=False, force=True, log=lambda _: None)
    prompting = json.loads((tmp_path / "x" / "peftkit.json").read_text())["prompting"]
    assert prompting["system_prompt"] == "You are the support assistant of a small shop."  # the first parent's


def test_arguments_are_checked_where_they_enter(make_adapter):
    with pytest.raises(MixError, match="gives 1 weights for 2 adapters"):
        parse_weights("1", 2)
    with pytest.raises(MixError, match="comma-separated numbers"):
        parse_weights("a,b", 2)
    assert parse_weights(None, 4) == [0.25] * 4
    with pytest.raises(MixError, match="--density in \\(0, 1\\]"):
        mix(["a", "b"], [0.5, 0.5], name="x", combination="dare_ties", log=lambda _: None)


def test_cli_mix_prints_the_check_and_the_registry_ref(make_adapter, tmp_path, capsys):
    from peftkit.cli import main

    a, b = make_adapter("lora", seed=1), make_adapter("lora", seed=2)
    code = main(["mix", str(a), str(b), "--weights", "0.7,0.3", "--name", "ties-mix", "--combination", "ties",
                 "--density", "0.5", "--out", str(tmp_path / "m"), "--registry", str(tmp_path / "reg")])
    out = capsys.readouterr().out
    assert code == 0 and "verified against peft's in-memory mix" in out and "registered: ties-mix@1" in out


def test_without_the_rslora_fix_pefts_mix_would_be_too_strong(make_adapter, tmp_path, monkeypatch):
    """Guards fix_rslora_scaling: if a peft release fixes add_weighted_adapter, this fails and the fix can go."""
    import peftkit.mix as mix_module

    monkeypatch.setattr(mix_module, "fix_rslora_scaling", lambda model, adapter: None)
    parent = make_adapter("lora", seed=3, use_rslora=True)
    assert distance_to_parent(parent, tmp_path / "same", [0.5, 0.5], "cat") > 1e-2
