"""Bottleneck adapters: our own small module (peft has none), with the same contract as peft's adapters.

`build` wraps a base model in a BottleneckModel; `save_pretrained` writes adapter_config.json
(peft_type PEFTKIT_BOTTLENECK) and adapter_model.safetensors; `load` reads them back onto a
base; `disable_adapter()` and `unload()` give the base model's behaviour back.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from peftkit.atomic import write_json
from peftkit.methods.bottleneck_layers import attach, build_adapters, decoder_layers
from peftkit.methods.errors import MethodError

PEFT_TYPE = "PEFTKIT_BOTTLENECK"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class BottleneckConfig:
    """What adapter_config.json records: enough to rebuild the adapters on a matching base."""

    hidden_size: int
    num_layers: int
    reduction_factor: int = 16
    placement: str = "both"
    activation: str = "relu"
    base_model_name_or_path: str | None = None
    peft_type: str = PEFT_TYPE

    @property
    def bottleneck_size(self) -> int:
        """Return the adapter's inner width: hidden size divided by the reduction factor (at least 1)."""
        return max(1, self.hidden_size // self.reduction_factor)

    def to_dict(self) -> dict:
        """Return the config as written to adapter_config.json (bottleneck_size included for readers)."""
        return {**asdict(self), "bottleneck_size": self.bottleneck_size}

    @classmethod
    def from_dict(cls, data: dict, where: str) -> BottleneckConfig:
        """Return the config read from adapter_config.json, checking its type and keys."""
        if data.get("peft_type") != PEFT_TYPE:
            raise MethodError(f"{where}: peft_type={data.get('peft_type')!r} is not {PEFT_TYPE}")
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("hidden_size", "num_layers") if n not in data]
        if missing:
            raise MethodError(f"{where}: missing {', '.join(missing)}; the adapter folder is damaged, save it again")
        return cls(**{k: v for k, v in data.items() if k in names})


class BottleneckModel(nn.Module):
    """A base causal LM with bottleneck adapters hooked into its decoder layers."""

    def __init__(self, model, config: BottleneckConfig):
        super().__init__()
        layers = decoder_layers(model)
        if config.num_layers != len(layers) or config.hidden_size != model.config.hidden_size:
            raise MethodError(f"the bottleneck adapter was made for {config.num_layers} layers of width {config.hidden_size}, "
                              f"but the base has {len(layers)} of width {model.config.hidden_size}: load it on the base it was trained on")
        self.base_model = model
        self.peft_config = {"default": config}  # train.save_adapter records the base name here, as for peft
        device = next(model.parameters()).device
        # fp32 adapters whatever the base dtype, as peft does, so small updates are not lost to bf16 rounding.
        self.layers = build_adapters(config.hidden_size, config.num_layers, config.bottleneck_size, config.placement,
                                     config.activation, device=device, dtype=torch.float32)
        self._enabled = True
        self._handles = attach(model, self.layers, lambda: self._enabled)

    def __getattr__(self, name: str):
        # Everything else (config, generation_config, gradient_checkpointing_enable, ...) is the base's, as in peft.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        """Return the base model's output with the adapters applied (labels named so the Trainer computes eval loss)."""
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, *args, **kwargs):
        """Return the base model's generate output with the adapters applied."""
        return self.base_model.generate(*args, **kwargs)

    def get_base_model(self):
        """Return the wrapped base model (with the hooks still attached; see unload)."""
        return self.base_model

    @contextmanager
    def disable_adapter(self):
        """Run the block as the base model alone."""
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = True

    def unload(self):
        """Return the base model with every adapter hook removed (nothing is merged)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.base_model

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        """Return the adapter weights only.

        The Trainer checkpoints models it does not know through state_dict(); the base's
        weights live in the base folder, and its tied embeddings would make safetensors refuse.
        """
        return self.layers.state_dict(destination=destination, prefix=prefix + "layers.", keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load adapter weights keyed as state_dict() gives them; the base's weights are never touched."""
        inner = {k.removeprefix("layers."): v for k, v in state_dict.items()}
        return self.layers.load_state_dict(inner, strict=strict, assign=assign)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, **kwargs) -> None:
        """Write adapter_config.json and adapter_model.safetensors into save_directory."""
        from safetensors.torch import save_file

        if not safe_serialization:
            raise MethodError("bottleneck adapters are saved as safetensors only; call save_pretrained(dir, safe_serialization=True)")
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(folder / CONFIG_NAME, self.peft_config["default"].to_dict())

    def print_trainable_parameters(self) -> None:
        """Print trainable and total parameter counts, as peft models do."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


def build(model, method_cfg) -> BottleneckModel:
    """Return the base (frozen) with trainable bottleneck adapters after attention and/or MLP."""
    config = BottleneckConfig(hidden_size=model.config.hidden_size, num_layers=len(decoder_layers(model)),
                              reduction_factor=method_cfg.reduction_factor, placement=method_cfg.adapter_placement,
                              base_model_name_or_path=getattr(model, "name_or_path", None) or None)
    if config.reduction_factor <= 0 or config.reduction_factor > config.hidden_size:
        raise MethodError(f"method.reduction_factor={config.reduction_factor} must be between 1 and the hidden size "
                          f"{config.hidden_size}; 16 is the usual choice")
    model.requires_grad_(False)
    return BottleneckModel(model, config)


def load(model, adapter_dir: Path, *, adapter_name: str = "default", is_trainable: bool = False) -> BottleneckModel:
    """Return the base model with the bottleneck adapter saved in adapter_dir attached."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    data = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    wrapped = BottleneckModel(model, BottleneckConfig.from_dict(data, str(adapter_dir / CONFIG_NAME)))
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise MethodError(f"{adapter_dir} holds no {WEIGHTS_NAME}; the adapter folder is incomplete, save it again")
    result = wrapped.load_state_dict(load_file(str(weights)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise MethodError(f"{weights} does not match its adapter_config.json (missing {result.missing_keys[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]}); the adapter folder is damaged, save it again")
    model.requires_grad_(False)
    wrapped.layers.requires_grad_(is_trainable)
    return wrapped
