"""Model resolution, dtype policy and the pad-token policy."""
import pytest
import torch

from peftkit import models
from peftkit.models import ModelError, resolve_dtype, resolve_model, set_pad_token


def test_bundled_alias_converts_once_to_safetensors(bundled_dir):
    assert (bundled_dir / "model.safetensors").is_file() and (bundled_dir / "tokenizer.json").is_file()
    # A second resolve is a cache hit: no conversion, same folder.
    assert resolve_model("smollm2-135m-instruct") == bundled_dir.resolve() or resolve_model("smollm2-135m-instruct").samefile(bundled_dir)
    import json
    config = json.loads((bundled_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576 and "quantization_config" not in config


def test_bundled_model_loads_and_answers(bundled_dir):
    from peftkit.data import build_prompt_ids
    from peftkit.models import load_base, load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_base("smollm2-135m-instruct", dtype="fp32")
    ids = torch.tensor([build_prompt_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])])
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_local_dir_and_errors(tiny_model_dir, tmp_path):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(ModelError, match="without config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "x.gguf"))


def test_hub_id_fails_fast_with_local_copy_advice():  # the session runs with HF_HUB_OFFLINE=1 (conftest)
    with pytest.raises(ModelError) as info:
        resolve_model("meta-llama/Llama-3.1-8B-Instruct")
    assert "hf download meta-llama/Llama-3.1-8B-Instruct" in str(info.value) and "model.name" in str(info.value)


def test_dtype_policy(monkeypatch):
    assert resolve_dtype("fp32") is torch.float32 and resolve_dtype("bf16") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from peftkit import hardware

    monkeypatch.setattr(hardware, "cpu_probe", lambda: {"choice": "bf16"})
    assert resolve_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(hardware, "cpu_probe", lambda: {"choice": "fp32"})
    assert resolve_dtype("auto") is torch.float32


def test_pad_token_is_never_eos(tokenizer):
    from transformers import AutoTokenizer

    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id != tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id < len(tokenizer)


def test_pad_policy_on_llama31_style_tokenizer(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|finetune_right_pad_id|>"]})
    tok.pad_token = None
    tok.eos_token = "<|eot_id|>"
    set_pad_token(tok)
    assert tok.pad_token == "<|finetune_right_pad_id|>"
