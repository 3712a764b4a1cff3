"""The pieces `peftkit.bench.gpu_train` trains with: the model (random weights, 4-bit on request), packed batches, one step.

Everything here is peftkit's own path where one exists: `build_method` wraps the base, peftkit's
Collator batches the packed rows, `SafeTrainer.compute_loss` computes the loss, and the step clips
gradients and steps AdamW as the Trainer does with peftkit's defaults (max_grad_norm 1, lr 2e-4).
"""
from __future__ import annotations

import random
import time
from types import SimpleNamespace

import torch

from peftkit.bench.train_bench import matmul_peak as cpu_matmul_peak
from peftkit.methods.footprint import llama31_8b_config

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1024}
"""The tiny Llama of --size tiny: Llama 3.1 8B's config (RoPE scaling and all) with these sizes."""
LORA = {"target_modules": "all-linear", "rank": 16, "alpha": 32.0, "dropout": 0.05}
# SafeTrainer.compute_loss needs only these attributes of its Trainer on the path a single, unwrapped,
# unsharded model takes: calling it with this stand-in measures exactly the loss `peftkit train` computes.
LOSS_OWNER = SimpleNamespace(sparse_logits=True, is_fsdp_enabled=False,
                             accelerator=SimpleNamespace(unwrap_model=lambda model: model))


def model_config(size: str):
    """Return the LlamaConfig of Llama 3.1 8B, or of the tiny 2-layer model with the same settings otherwise."""
    config = llama31_8b_config()
    if size == "tiny":
        config.update(TINY)
    return config


def build_model(method: str, config, *, device: str, dtype: torch.dtype, attn: str, checkpointing: bool):
    """Return (the model peftkit trains with method, the base's parameter count N), built with random weights on device."""
    from transformers import LlamaForCausalLM

    from peftkit.config import MethodConfig
    from peftkit.methods import build_method

    with torch.device(device):  # straight onto the GPU, in dtype: the 16 GB of bf16 never touch host RAM
        base = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn)
    parameters = sum(p.numel() for p in base.parameters())
    if method == "qlora":
        quantize_nf4(base, dtype)
    model = build_method(base, MethodConfig(name=method, **LORA))
    if checkpointing:
        # What Trainer(activation_checkpointing=True) and peftkit.train.build_model do: non-reentrant checkpoints.
        base.activation_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    return model, parameters


def quantize_nf4(model, dtype: torch.dtype) -> None:
    """Replace the decoder's Linear layers by bitsandbytes 4-bit NF4 layers quantized from their weights, in place.

    transformers 5.24 quantizes only while loading a checkpoint (`from_config` takes no
    quantization_config), and writing 16 GB of random weights to read them back costs minutes and
    disk. So: `replace_with_bnb_linear` swaps in empty Linear4bit layers with a BitsAndBytesConfig's
    settings (lm_head stays, as transformers leaves it), each is quantized from the bf16 weight it
    replaces the way transformers' own Bnb4bitQuantize does, and `is_loaded_in_4bit` is set as the
    bnb quantizer sets it after loading (peft and peftkit's qlora builder read it). Quant storage is
    the compute dtype (FSDP can shard it; same bytes as uint8, which peftkit.models.load_base uses).
    """
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    settings = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    weights = {name: m.weight for name, m in model.named_modules() if type(m) is torch.nn.Linear and name != "lm_head"}
    replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=settings)
    for name in list(weights):
        module, weight = model.get_submodule(name), weights.pop(name)  # popped: each bf16 weight is freed once quantized
        module.weight = bnb.nn.Params4bit(weight.data, requires_grad=False, **module.weight.__dict__).to(weight.device)
    model.is_loaded_in_4bit = True


def count_4bit(model) -> int:
    """Return how many of the model's layers hold a bitsandbytes 4-bit weight."""
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def example_lengths(rng: random.Random, seq: int) -> list[int]:
    """Return random example lengths (each 1/16 to 1/2 of seq) that fill seq exactly; the last is cut to fit."""
    lengths: list[int] = []
    while sum(lengths) < seq:
        lengths.append(min(rng.randint(max(1, seq // 16), max(1, seq // 2)), seq - sum(lengths)))
    return lengths


def packed_batches(count: int, *, batch: int, seq: int, vocab: int, attn: str, device: str,
                   seed: int = 0) -> tuple[list[dict], float]:
    """Return (count batches of batch full rows of seq random tokens, examples per row), as peftkit's Collator makes them.

    Each example's position_ids restart at 0 and its first label is -100, so no token is predicted
    across an example boundary; the Collator adds the block mask (SDPA) or flattens the rows (flash).
    """
    from peftkit.data.masks import IGNORE
    from peftkit.data.packing import Collator

    rng = random.Random(seed)
    collate = Collator(pad_id=0, packing=True, attn_implementation=attn)
    batches, examples = [], 0
    for _ in range(count):
        rows = []
        for _ in range(batch):
            ids, positions, lengths = [rng.randrange(vocab) for _ in range(seq)], [], example_lengths(rng, seq)
            labels = list(ids)
            for n in lengths:
                labels[len(positions)] = IGNORE
                positions.extend(range(n))
            rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
            examples += len(lengths)
        batches.append({key: value.to(device) for key, value in collate(rows).items()})
    return batches, examples / (count * batch)


def train_step(model, optimizer, trainable: list, inputs: dict) -> torch.Tensor:
    """Return the step's loss (detached, not synced) after backward, gradient clipping and one AdamW step."""
    from peftkit.trainer import SafeTrainer

    loss = SafeTrainer.compute_loss(LOSS_OWNER, model, dict(inputs))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def matmul_peak(device: str, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Return measured matmul FLOP/s in dtype: 8192-square products on a GPU, train_bench's probe on a CPU."""
    if device != "cuda":
        return cpu_matmul_peak({torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype], seconds)
    size = 8192  # large enough to saturate an H200's tensor cores; 2048 leaves it launch-bound
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty_like(a)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    torch.cuda.synchronize()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            torch.matmul(a, b, out=out)
        torch.cuda.synchronize()
        runs += 10
    return 2 * size ** 3 * runs / (time.perf_counter() - started)
