"""Prefix tuning and prompt tuning through peft, with a generate that works on transformers 5.

peft 0.21's own generate for these methods hands the learned prefix to the model as
`past_key_values` and reads `cache_position`; transformers 5 names the cache `cache` and
no longer passes `cache_position`, so the prefix was silently dropped (prefix tuning
generated as the base model) and left-padded prompts got shifted positions. Our subclass
generates through the base model's own `generate` instead: the virtual tokens go in as a
pre-filled cache (prefix) or as leading input embeddings (prompt), and position ids come
from the attention mask, exactly as in the training forward pass.

Packed training rows (several examples, a 4D block mask) are handled here too: peft would
fail on the 4D mask; we let every example see the virtual tokens, as if trained alone.

Where virtual tokens sit is written once, here, for training and for the server alike: peft's
prefix table (`prefix_table` writes it, `split_prefix_table` reads it back per layer) and the
prefill's mask and positions (`virtual_prefill`), which peftkit.serving uses for its batches.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, PeftModelForCausalLM, PeftType

from peftkit.methods.errors import MethodError


class PromptLearningCausalLM(PeftModelForCausalLM):
    """A peft prefix/prompt-tuning model whose generate injects the virtual tokens the transformers 5 way."""

    _peftkit_disabled = False

    @contextmanager
    def disable_adapter(self):
        """Run the block with the virtual tokens switched off (generate included)."""
        with super().disable_adapter():
            self._peftkit_disabled = True
            try:
                yield
            finally:
                self._peftkit_disabled = False

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        """Return the model output; packed batches (4D block masks) get the virtual tokens once per example."""
        if attention_mask is not None and attention_mask.dim() == 4 and input_ids is not None:
            position_ids = kwargs.pop("position_ids", None)
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            return self._packed_forward(input_ids, attention_mask, position_ids, labels, **kwargs)
        position_ids = kwargs.get("position_ids")
        if attention_mask is None and position_ids is not None and bool((position_ids[..., 1:] == 0).any()):
            raise MethodError("prefix and prompt tuning need data.packing=false, or packing with model.attn_implementation "
                              "sdpa or eager (a block mask per example); flash-attention packing gives them no mask to extend")
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               labels=labels, **kwargs)

    def _packed_forward(self, input_ids, mask, position_ids, labels, **kwargs):
        # peft would glue a 2D row of ones onto the 4D block mask (and fail) and, for prompt tuning,
        # drop position_ids. Instead every example in the row gets to see all virtual tokens, and its
        # positions start after them, exactly as if it had been trained alone.
        config = self.active_peft_config
        n, (batch, width) = config.num_virtual_tokens, input_ids.shape
        see_virtual = _mask_like(mask, torch.ones(batch, 1, width, n, dtype=torch.bool, device=mask.device))
        if config.peft_type == PeftType.PREFIX_TUNING:
            return self.base_model(input_ids=input_ids, attention_mask=torch.cat([see_virtual, mask], dim=-1),
                                   position_ids=position_ids + n, cache=self.get_prompt(batch_size=batch), labels=labels,
                                   **kwargs)
        embeds = self.word_embeddings(input_ids)
        embeds = torch.cat([self.get_prompt(batch_size=batch).to(embeds.dtype), embeds], dim=1)
        causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
        virtual_rows = torch.cat([causal, torch.zeros(n, width, dtype=torch.bool, device=mask.device)], dim=-1)
        top = _mask_like(mask, virtual_rows.expand(batch, 1, n, n + width))
        full_mask = torch.cat([top, torch.cat([see_virtual, mask], dim=-1)], dim=2)
        positions = torch.cat([torch.arange(n, device=position_ids.device).expand(batch, n), position_ids + n], dim=1)
        if labels is not None:
            labels = torch.cat([torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device), labels], dim=1)
        return self.base_model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions, labels=labels, **kwargs)

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """Return the generated sequences (prompt ids followed by new ids), like the base model's generate."""
        base = self.get_base_model()
        if self._peftkit_disabled or input_ids is None:
            return base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        config = self.active_peft_config
        n, batch = config.num_virtual_tokens, input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = torch.ones(batch, n, dtype=attention_mask.dtype, device=attention_mask.device)
        # Placeholder ids stand where the virtual tokens sit; generate never embeds them (cache or embeds cover them).
        filler = torch.zeros(batch, n, dtype=input_ids.dtype, device=input_ids.device)
        if config.peft_type == PeftType.PREFIX_TUNING:
            kwargs["cache"] = self.get_prompt(batch_size=batch)
        else:
            embeds = self.word_embeddings(input_ids)
            kwargs["inputs_embeds"] = torch.cat([self.get_prompt(batch_size=batch).to(embeds.dtype), embeds], dim=1)
        out = base.generate(input_ids=torch.cat([filler, input_ids], dim=1),
                            attention_mask=torch.cat([ones, attention_mask], dim=1), **kwargs)
        if isinstance(out, torch.Tensor):
            return out[:, n:]
        out.sequences = out.sequences[:, n:]
        return out


def virtual_prefill(prompt_lengths: list[int], n: int, *, in_cache: bool,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Return (attention mask, position ids, left pads) to prefill left-padded prompts behind n virtual tokens.

    Placed as in training: every prompt token sees all n virtual tokens, which take positions
    0..n-1, and the prompt's positions start at n. Keys and values in the cache (prefix
    tuning, in_cache) sit before the padding: the mask covers those n columns and the position ids
    only the input. Embeddings in the input (prompt tuning) sit right after the padding, and the mask
    and position ids cover them. n=0 gives the plain left-padded prefill.
    """
    width = max(prompt_lengths)
    pads = [width - length for length in prompt_lengths]
    cached = n if in_cache else 0
    inline = n - cached
    mask = torch.tensor([[1] * cached + [0] * p + [1] * (inline + length) for p, length in zip(pads, prompt_lengths)],
                        device=device)
    # Every real or virtual token before a position counts, so the prompt's positions start after the virtual ones.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, cached:]
    return mask, positions, pads


def _mask_like(mask: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Return allowed (bool) in mask's convention: bool for sdpa, additive 0 / -inf-like floats for eager."""
    if mask.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device).masked_fill(~allowed, torch.finfo(mask.dtype).min)


def build_prefix(model, method_cfg):
    """Return the model with learned key/value prefixes in every layer (optionally through an MLP).

    Without the MLP, the prefix starts as the keys and values the base computes for random
    vocabulary tokens, as Li & Liang (2021) advise (real-word activations): peft's own random
    start is N(0, 1) noise that lifted SmolLM2's loss from 5.0 to 11.1 before any training,
    while real activations start at the base's loss (4.9). With the MLP the prefix is its
    output, which has no such start; peft's initialization is kept there.
    """
    from peft import PrefixTuningConfig, TaskType

    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method_cfg.num_virtual_tokens,
                                prefix_projection=method_cfg.prefix_projection,
                                encoder_hidden_size=model.config.hidden_size)
    start = None
    if not method_cfg.prefix_projection and not next(model.parameters()).is_meta:  # meta: sizes only, no values
        start = vocabulary_activations(model, method_cfg.num_virtual_tokens)
    peft_model = _wrap(model, config)
    if start is not None:
        embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
        with torch.no_grad():
            embedding.weight.copy_(start.to(embedding.weight.dtype))
    return peft_model


def vocabulary_activations(model, n: int) -> torch.Tensor:
    """Return (n, layers * 2 * kv width): each layer's keys and values for n random vocabulary tokens, in peft's prefix layout."""
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=next(model.parameters()).device)
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).cache
    keys = torch.stack([layer.keys[0] for layer in cache.layers])      # (layers, kv heads, n, head dim)
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return prefix_table(keys, values)


# peft's prefix layout, written by prefix_table and read back by split_prefix_table (the server reads saved
# prefixes with it): one row per virtual token holding, for every layer, its key then its value, each (kv heads, head dim).

def prefix_table(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Return peft's prefix table (n, layers * 2 * kv heads * head dim) for keys and values of (layers, kv heads, n, head dim)."""
    n = keys.shape[2]
    return torch.stack([keys, values], dim=1).permute(3, 0, 1, 2, 4).reshape(n, -1)


def split_prefix_table(table: torch.Tensor, config: dict) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Return (keys, values), one (kv heads, n, head dim) tensor per layer, from a prefix table of n rows.

    config is the adapter's adapter_config.json: num_layers, num_attention_heads (the kv heads) and token_dim.
    """
    n, layers, heads = table.shape[0], int(config["num_layers"]), int(config["num_attention_heads"])
    kv = table.view(n, layers * 2, heads, int(config["token_dim"]) // heads).permute(1, 2, 0, 3)
    return tuple(kv[0::2].contiguous()), tuple(kv[1::2].contiguous())


def build_prompt(model, method_cfg):
    """Return the model with learned soft-prompt embeddings, initialized from a text or from sampled vocabulary.

    Without a text we start from the embeddings of random vocabulary tokens (Lester et al. 2021
    found this far better than random vectors): peft's plain random start draws N(0, 1) vectors,
    seven times the scale of SmolLM2's word embeddings (std 0.14), and the first loss jumps above the base's.
    """
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    text = method_cfg.prompt_init_text
    if text is not None and not text.strip():
        raise MethodError("method.prompt_init_text is empty; give a short task description such as "
                          "'Answer the customer's question politely', or leave it unset for a random start")
    extra = {"prompt_tuning_init": PromptTuningInit.SAMPLE_VOCAB}
    if text:
        tokenizer_dir = Path(getattr(model, "name_or_path", "") or "")
        if not (tokenizer_dir / "tokenizer_config.json").is_file():
            raise MethodError(f"method.prompt_init_text needs the base model's tokenizer, but {str(tokenizer_dir)!r} holds "
                              "none; load the base through peftkit.models.load_base or unset method.prompt_init_text")
        extra = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": text,
                 "tokenizer_name_or_path": str(tokenizer_dir)}
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method_cfg.num_virtual_tokens, **extra)
    return _wrap(model, config)


def load(model, adapter_dir: Path, *, adapter_name: str = "default", is_trainable: bool = False):
    """Return the base model with a saved prefix- or prompt-tuning adapter attached."""
    config = PeftConfig.from_pretrained(adapter_dir)
    # Text initialization re-reads the tokenizer when loading for more training; the adapter folder carries one.
    tok = getattr(config, "tokenizer_name_or_path", None)
    if tok and not Path(tok).is_dir() and (adapter_dir / "tokenizer_config.json").is_file():
        config.tokenizer_name_or_path = str(adapter_dir)
    peft_model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable,
                                           config=config)
    peft_model.__class__ = PromptLearningCausalLM  # same object and state, only generate and disable_adapter differ
    return peft_model


def _wrap(model, config):
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    peft_model.__class__ = PromptLearningCausalLM  # same object and state, only generate and disable_adapter differ
    return peft_model
