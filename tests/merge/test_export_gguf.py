"""peftkit export gguf: the file transformers reads back matches the merged model; an Ollama Modelfile lies beside it."""
from __future__ import annotations

import pytest

from peftkit.export import TOLERANCE, ExportError, export_gguf
from peftkit.merge import VerificationError


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_exported_gguf_reads_back_within_the_tolerance_of_its_type(make_adapter, tmp_path, gguf_type):
    from gguf import GGUFReader

    out = tmp_path / "out" / f"model-{gguf_type}.gguf"
    lines: list[str] = []
    result = export_gguf(str(make_adapter("lora")), out, gguf_type=gguf_type, log=lines.append)
    assert out.is_file() and 0 < result.diff.relative <= TOLERANCE[gguf_type]
    assert any(line.startswith("read back with transformers: max |logit difference|") for line in lines)
    assert not list(out.parent.glob(".*"))  # no temporary file or merge folder left behind
    reader = GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items() if name in (
        "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.eot_token_id",
        "llama.block_count", "llama.attention.head_count_kv")}
    assert fields == {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
                      "tokenizer.ggml.eot_token_id": 2, "llama.block_count": 2, "llama.attention.head_count_kv": 2}
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == gguf_type.upper()


def test_a_missing_qk_permutation_fails_the_read_back(make_adapter, tmp_path, monkeypatch):
    import peftkit.export.gguf_file as gguf_file

    monkeypatch.setattr(gguf_file, "permute_qk", lambda name, weights, config: weights)
    out = tmp_path / "model.gguf"
    with pytest.raises(VerificationError, match=r"GGUF \(f16\) read back with transformers .* FAILED"):
        export_gguf(str(make_adapter("lora")), out, log=lambda _: None)
    assert not out.exists() and not list(tmp_path.glob(".model*"))


def test_modelfile_translates_the_chatml_template_and_names_the_stop_tokens(make_adapter, tmp_path):
    out = tmp_path / "m.gguf"
    result = export_gguf(str(make_adapter("ia3")), out, log=lambda _: None)
    text = result.modelfile.read_text()
    assert result.modelfile == tmp_path / "Modelfile"
    assert "FROM ./m.gguf" in text
    assert 'TEMPLATE """{{- if .System }}<|im_start|>system' in text and "{{ .Content }}<|im_end|>" in text
    assert 'SYSTEM """You are the support assistant of a small shop."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_modelfile_uses_the_templates_own_default_system_prompt(tmp_path, tokenizer):
    from peftkit.export.modelfile import write_modelfile
    from peftkit.prompting import Prompting

    path = write_modelfile(tmp_path / "m.gguf", tokenizer, Prompting(None, None, ("<|im_end|>",)), ["<|im_end|>"])
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in path.read_text()


def test_modelfile_says_why_a_template_that_is_not_chatml_is_not_translated(tmp_path, tokenizer):
    from peftkit.export.modelfile import write_modelfile
    from peftkit.prompting import Prompting

    llama3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
              "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    path = write_modelfile(tmp_path / "x.gguf", tokenizer, Prompting("Be brief.", llama3, ("<|eot_id|>",)), ["<|eot_id|>"])
    text = path.read_text()
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "")
    assert "not ChatML-style" in text and 'SYSTEM """Be brief."""' in text and 'PARAMETER stop "<|eot_id|>"' in text


def test_a_full_model_folder_is_exported_without_merging(make_adapter, tmp_path):
    from peftkit.merge import merge

    merged = merge(str(make_adapter("dora")), tmp_path / "merged", dtype="bf16", log=lambda _: None).out
    result = export_gguf(str(merged), tmp_path / "m.gguf", gguf_type="bf16", log=lambda _: None)
    assert result.merged_from is None and result.diff.relative <= TOLERANCE["bf16"]


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    with pytest.raises(ExportError, match="--type 'q4_k' is not offered; choose one of f16, bf16, q8_0"):
        export_gguf("x", tmp_path / "m.gguf", gguf_type="q4_k")
    with pytest.raises(ExportError, match="with a .gguf suffix"):
        export_gguf("x", tmp_path / "m.bin")


def test_an_unknown_pre_tokenizer_is_refused_with_the_option_to_name_it(tokenizer, monkeypatch):
    import peftkit.export.gguf_file as gguf_file

    monkeypatch.setattr(gguf_file, "KNOWN_PRE", {})
    with pytest.raises(ExportError, match="--tokenizer-pre NAME"):
        gguf_file.pre_tokenizer(tokenizer)


def test_bundled_model_exports_and_reads_back(tmp_path, bundled_dir):
    """The real 30-layer model, 9 query / 3 key-value heads: the q/k permutation is checked on GQA (about 16 s)."""
    result = export_gguf(str(bundled_dir), tmp_path / "smollm2-q8_0.gguf", gguf_type="q8_0", log=lambda _: None)
    assert result.diff.relative <= TOLERANCE["q8_0"]
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in result.modelfile.read_text()


def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path, tokenizer, monkeypatch):
    """Llama 3.1's rope scaling: llama.cpp's rope_freqs factors, and a read-back that applies the same scaling."""
    import math

    import numpy as np
    import torch
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=True, rope_parameters=rope)
    torch.manual_seed(0)
    folder = tmp_path / "llama3-rope"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = export_gguf(str(folder), tmp_path / "m.gguf", log=lambda _: None)
    assert result.diff.relative <= TOLERANCE["f16"]
    factors = next(t for t in GGUFReader(tmp_path / "m.gguf").tensors if t.name == "rope_freqs.weight").data
    wavelengths = 2 * math.pi * 500000.0 ** (np.arange(0, 16, 2) / 16)
    assert factors[0] == 1.0 and factors[-1] == 8.0  # short wavelengths kept, long ones scaled by factor
    assert len(factors) == 8 and np.all(np.diff(factors) >= 0) and wavelengths[-1] > 64
    # transformers' reader ignores rope_freqs: read back without the source's rope scaling, the check fails
    import peftkit.export as export_module
    from transformers import AutoConfig

    monkeypatch.setattr(export_module, "read_back_config",
                        lambda model_dir, path: AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
    with pytest.raises(VerificationError):
        export_gguf(str(folder), tmp_path / "n.gguf", log=lambda _: None)
