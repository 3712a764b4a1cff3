"""Exact trainable parameters and adapter sizes of each method on Llama 3.1 8B, built on the meta device.

Nothing is downloaded and no weight is allocated: the real architecture is built from its
config on `torch.device("meta")`, each method's own builder is applied to it, and we count
the parameters that train and the bytes of the tensors `save_pretrained` would write.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

# meta-llama/Llama-3.1-8B-Instruct, config.json on the Hugging Face hub (same numbers for the base
# Llama-3.1-8B): hidden 4096, MLP 14336, 32 layers, 32 query heads sharing 8 key/value heads,
# vocabulary 128,256, RoPE theta 500,000 with llama3 scaling to 131,072 positions, untied embeddings.
LLAMA31_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}
NF4_BLOCK = 64          # bitsandbytes 4-bit block size: one absmax per 64 weights
NESTED_BLOCK = 256      # double quantization: the 8-bit absmaxes are themselves quantized in blocks of 256


@dataclass
class Footprint:
    """What one method costs on a model: parameters that train and bytes the adapter folder holds."""

    method: str
    trainable: int
    base_parameters: int
    saved_bytes: int
    saved_dtypes: str
    base_bytes: int
    """Bytes of the base's weights as the method loads them (4-bit NF4 for qlora, the model dtype otherwise)."""

    @property
    def percent(self) -> float:
        """Return trainable parameters as a percentage of the base model's."""
        return 100 * self.trainable / self.base_parameters


def llama31_8b_config():
    """Return the LlamaConfig of Llama 3.1 8B (see LLAMA31_8B for the source)."""
    from transformers import LlamaConfig

    return LlamaConfig(**copy.deepcopy(LLAMA31_8B))


def measure(method_cfg, model_config=None, dtype: torch.dtype = torch.bfloat16) -> Footprint:
    """Return the exact footprint of method_cfg on a meta-device model (Llama 3.1 8B by default)."""
    from transformers import LlamaForCausalLM

    from peftkit.methods import CATALOG, builder, lora

    model_config = model_config or llama31_8b_config()
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config).to(dtype)
        base_parameters = sum(p.numel() for p in model.parameters())
        quantized = CATALOG[method_cfg.name].quantized_base
        base_bytes = nf4_bytes(model) if quantized else sum(p.numel() * p.element_size() for p in model.parameters())
        cfg = copy.copy(method_cfg)
        cfg.prompt_init_text = None  # the text only sets starting values, never sizes; it would need the tokenizer
        # A 4-bit base cannot live on the meta device; QLoRA's adapter is exactly LoRA's on the same layers.
        wrapped = (lora.build if quantized else builder(cfg.name))(model, cfg)
        trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        saved = saved_tensors(wrapped)
    return Footprint(method=method_cfg.name, trainable=trainable, base_parameters=base_parameters,
                     saved_bytes=sum(t.numel() * t.element_size() for t in saved.values()),
                     saved_dtypes=", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in saved.values()})),
                     base_bytes=base_bytes)


def saved_tensors(model) -> dict:
    """Return {name: tensor} exactly as the model's save_pretrained writes them."""
    from peft import PeftModel, PeftType, get_peft_model_state_dict

    if isinstance(model, PeftModel):
        config = model.active_peft_config
        if config.is_prompt_learning:
            # peft's get_prompt_embedding_to_save ends in .cpu(), which a meta tensor refuses; this is its body
            # without that last step: the virtual tokens through the prompt encoder (its MLP included).
            name = model.active_adapter
            tokens = model.prompt_tokens[name].unsqueeze(0)
            if config.peft_type == PeftType.PREFIX_TUNING:
                tokens = tokens[:, :config.num_virtual_tokens]
            return {"prompt_embeddings": model.prompt_encoder[name](tokens.to(model.prompt_encoder[name].embedding.weight.device))[0]}
        return get_peft_model_state_dict(model)
    if hasattr(model, "peft_config"):  # our bottleneck adapters: state_dict() is the adapter alone
        return model.state_dict()
    from peftkit.methods.full import tied_names

    tied = tied_names(model)  # full fine-tuning saves the whole model, tied tensors once
    return {name: tensor for name, tensor in model.state_dict().items() if name not in tied}


def nf4_bytes(model) -> int:
    """Return the bytes of the base in 4-bit NF4 with double quantization, as bitsandbytes stores it.

    Decoder linear weights take half a byte each plus one 8-bit absmax per 64 weights and one
    fp32 absmax per 256 of those; embeddings, lm_head and norms keep the model dtype.
    """
    total = 0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.Linear) and pname == "weight" and name != "lm_head":
                blocks = -(-p.numel() // NF4_BLOCK)
                total += p.numel() // 2 + blocks + 4 * -(-blocks // NESTED_BLOCK)
            else:
                total += p.numel() * p.element_size()
    return total
