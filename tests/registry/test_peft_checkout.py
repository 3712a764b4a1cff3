"""Adapters saved by real peft pass validation, and a checkout loads with stock PeftModel.from_pretrained."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peftkit.fingerprint import base_fingerprint  # noqa: E402

METHODS = {
    "lora": lambda: peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    "dora": lambda: peft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM"),
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Return the folder of a tiny random Llama saved with save_pretrained (2 layers, GQA)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=256)
    folder = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _load_base(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_saved_adapter_registers_and_its_checkout_loads_with_identical_logits(reg, base, tmp_path, method):
    torch.manual_seed(1)
    model = peft.get_peft_model(_load_base(base), METHODS[method]())
    with torch.no_grad():  # move the adapter away from its identity init so the comparison means something
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    entry = reg.add(tmp_path / "adapter", f"tiny-{method}", base_model_dir=base)
    assert entry.base_fingerprint == base_fingerprint(base) and entry.method == method

    loaded = peft.PeftModel.from_pretrained(_load_base(base), str(reg.checkout(entry.ref))).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
