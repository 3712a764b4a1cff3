"""peftkit merge: every mergeable method folds into the base and is verified; the rest are refused with why."""
from __future__ import annotations

import json

import pytest

from peftkit.merge import MergeError, VerificationError, merge

MERGEABLE = [("lora", {}), ("rslora", {"use_rslora": True}), ("dora", {}), ("ia3", {}), ("qlora", {})]


@pytest.mark.parametrize("label,fields", MERGEABLE, ids=[m for m, _ in MERGEABLE])
def test_merge_is_verified_and_writes_a_plain_model(make_adapter, tmp_path, label, fields):
    method = "lora" if label == "rslora" else label
    adapter = make_adapter(method, **fields)
    out = tmp_path / "merged"
    lines: list[str] = []
    result = merge(str(adapter), out, log=lines.append)
    assert 0 <= result.diff.relative <= 1e-4 and result.diff.tolerance == 1e-4
    assert any("verified against base + adapter: max |logit difference|" in line for line in lines)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2]  # <|im_end|>, the template's end of turn and the EOS token
    lineage = json.loads((out / "peftkit.json").read_text())
    assert lineage["method"] == "full" and lineage["merged_from"]["method"] == method
    assert lineage["prompting"]["system_prompt"].startswith("You are the support assistant")
    if method == "qlora":
        assert result.nf4_gap is not None and result.nf4_gap.max_abs > 0


def test_merged_model_differs_from_base_and_answers_like_base_plus_adapter(make_adapter, tiny_model_dir, tmp_path):
    """The merged folder is the adapted model: the same logits as base + adapter, not the base's."""
    from peftkit.generate import load_session
    from peftkit.merge import compare, logits_for, sample_prompts

    adapter = make_adapter("lora")
    merge(str(adapter), tmp_path / "merged", log=lambda _: None)
    adapted = load_session(str(adapter), dtype="fp32")
    prompts = sample_prompts(adapted.tokenizer, adapted.system_prompt, adapted.chat_template)
    merged = load_session(str(tmp_path / "merged"), dtype="fp32")
    base = load_session(None, base=str(tiny_model_dir), dtype="fp32")
    reference = logits_for(adapted.model, prompts)
    assert compare(reference, logits_for(merged.model, prompts), 1e-4).relative < 1e-4
    assert compare(reference, logits_for(base.model, prompts), 1e-4).relative > 1e-2
    assert merged.stop_ids == adapted.stop_ids and merged.system_prompt == adapted.system_prompt


def test_bf16_merge_is_verified_with_the_bf16_tolerance(make_adapter, tmp_path):
    result = merge(str(make_adapter("lora")), tmp_path / "merged", dtype="bf16", log=lambda _: None)
    assert result.dtype == "bf16" and result.diff.tolerance == pytest.approx(5e-2)
    assert 0 < result.diff.relative <= result.diff.tolerance
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_merge_that_skips_a_layer_fails_verification_and_writes_nothing(make_adapter, tmp_path, monkeypatch, dtype):
    import peftkit.merge as merge_module

    real_fold = merge_module.fold

    def skip_first_layer(model):
        module = next(m for name, m in model.named_modules() if name.endswith("layers.0.self_attn.q_proj"))
        for weight in module.lora_B.values():
            weight.weight.data.zero_()  # this layer's update is lost, as a buggy merge would lose it
        return real_fold(model)

    monkeypatch.setattr(merge_module, "fold", skip_first_layer)
    out = tmp_path / "merged"
    with pytest.raises(VerificationError, match="FAILED: max \\|logit difference\\|"):
        merge(str(make_adapter("lora")), out, dtype=dtype, log=lambda _: None)
    assert not out.exists()
    assert not list(tmp_path.glob(".merged*"))  # the staging folder is gone too


@pytest.mark.parametrize("method,words", [
    ("prefix", "virtual tokens are inputs, not weights"),
    ("prompt", "peftkit serve"),
    ("bottleneck", "adds modules the base model does not have"),
    ("full", "already a full model"),
])
def test_unmergeable_methods_are_refused_with_what_to_do(make_adapter, tmp_path, method, words):
    adapter = make_adapter(method)
    with pytest.raises(MergeError, match=words):
        merge(str(adapter), tmp_path / "merged", log=lambda _: None)
    assert not (tmp_path / "merged").exists()


def test_a_different_base_is_refused(make_adapter, tmp_path, bundled_dir):
    with pytest.raises(MergeError, match="merging into another base gives another model"):
        merge(str(make_adapter("lora")), tmp_path / "merged", base=str(bundled_dir), log=lambda _: None)


def test_merged_model_registers_and_loads_from_the_registry(make_adapter, tmp_path):
    from peftkit.generate import generate, load_session
    from peftkit.registry import Registry

    registry = tmp_path / "registry"
    Registry(registry).add(make_adapter("lora"), name="bot")
    result = merge("bot@1", tmp_path / "merged", registry=str(registry), register="merged-bot", log=lambda _: None)
    assert result.registry_ref == "merged-bot@1"
    entry = Registry(registry).show("merged-bot@1")
    assert entry.method == "full" and entry.parent == "bot@1"
    session = load_session("merged-bot@1", registry=str(registry), dtype="fp32")
    reply = generate(session, [[{"role": "user", "content": "Hi"}]], max_new_tokens=4)
    assert isinstance(reply[0], str)


def test_cli_merge_prints_the_difference_and_fails_loudly(make_adapter, tmp_path, capsys, monkeypatch):
    from peftkit.cli import main

    assert main(["merge", str(make_adapter("ia3")), "--out", str(tmp_path / "m")]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    assert main(["merge", str(make_adapter("prefix")), "--out", str(tmp_path / "p")]) == 2
    assert "cannot be merged" in capsys.readouterr().err


def test_nf4_base_merges_qlora_into_the_base_it_was_trained_against(make_adapter, tmp_path):
    """By default QLoRA folds into the original base (and says how far the NF4-trained model lies); --nf4-base
    folds it into the dequantized NF4 base, which reproduces the trained QLoRA model."""
    adapter = make_adapter("qlora")
    plain = merge(str(adapter), tmp_path / "plain", log=lambda _: None)
    as_trained = merge(str(adapter), tmp_path / "nf4", nf4_base=True, log=lambda _: None)
    assert as_trained.diff.relative <= 1e-4
    assert plain.nf4_gap.relative > 1e-2 and as_trained.nf4_gap.relative < 1e-4
    assert json.loads((tmp_path / "nf4" / "peftkit.json").read_text())["merged_from"]["nf4_base"] is True
    with pytest.raises(MergeError, match="--nf4-base is for adapters trained on a 4-bit base"):
        merge(str(make_adapter("lora")), tmp_path / "x", nf4_base=True, log=lambda _: None)
