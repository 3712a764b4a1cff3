"""Fold an adapter into its base: a plain transformers folder that appears only once its logits are checked.

`merge` loads base + adapter exactly as generation does (load_session), records their logits on a few
prompts rendered with the training chat template, folds the adapter in with peft's merge_and_unload,
saves the model, tokenizer and stop tokens into a hidden staging folder, reloads that folder from disk
and compares. Beyond the tolerance for the dtype the staging folder is removed and nothing appears.

Which methods fold is the catalog's `mergeable`; the others are refused with what to do instead.
QLoRA folds into the base loaded unquantized in its own dtype, and how far the NF4-trained model lies
from the result is printed; nf4_base=True folds it into the NF4 round trip of the base it was trained on.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from peftkit import __version__
from peftkit.errors import PeftkitError
from peftkit.methods.catalog import MODEL, VIRTUAL
from peftkit.prompting import Prompting

# Largest |logit difference| allowed, as a fraction of the largest |logit| (docs/merge.md says why).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPE_KEYS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SAMPLE_CONVERSATIONS = (
    [{"role": "user", "content": "Where is my order?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "Can I return a jacket that does not fit?"},
     {"role": "assistant", "content": "Yes, within thirty days."},
     {"role": "user", "content": "And shoes?"}],
)
# Why a method's adapter cannot be folded into the base, keyed by how the server runs it.
SERVE_INSTEAD = ("Serve it as it is (peftkit serve / peftkit generate --adapter), "
                 "or train method.name=lora to get a mergeable adapter")
WHY_NOT = {VIRTUAL: "its learned virtual tokens are inputs, not weights, so there is nothing to add to the base. " + SERVE_INSTEAD,
           MODEL: "it adds modules the base model does not have. " + SERVE_INSTEAD}


class MergeError(PeftkitError):
    """An adapter cannot be merged, or its merged model failed the check."""


class VerificationError(MergeError):
    """A merged or exported model's logits differ from the reference beyond the tolerance."""

    exit_code = 3


@dataclass(frozen=True)
class Diff:
    """How far one model's logits lie from a reference's on the sample prompts."""

    max_abs: float
    scale: float
    tolerance: float
    positions: int

    @property
    def relative(self) -> float:
        """Return max_abs as a fraction of the reference's largest |logit|."""
        return self.max_abs / self.scale

    def __str__(self) -> str:
        return (f"max |logit difference| {self.max_abs:.3g} = {self.relative:.3g} of the logit scale {self.scale:.3g} "
                f"(tolerance {self.tolerance:g}; {self.positions} positions)")


@dataclass
class MergeResult:
    """What merge wrote and how close it came."""

    out: Path
    """The merged model's folder (a plain transformers model)."""
    method: str
    dtype: str
    diff: Diff
    """The largest logit difference between the merged model and base + adapter."""
    registry_ref: str | None = None
    nf4_gap: Diff | None = None
    """QLoRA only: how far the NF4 model it was trained on lies from the merged one."""


def merge(ref_or_dir: str, out: str | Path, *, registry: str | None = None, base: str | None = None,
          dtype: str | None = None, register: str | None = None, nf4_base: bool = False,
          log: Callable[[str], None] = print) -> MergeResult:
    """Return the result of folding the adapter into its base, written to out only once verified."""
    from peftkit.atomic import write_folder
    from peftkit.generate import resolve_adapter
    from peftkit.methods import read_adapter_meta
    from peftkit.models import resolve_dtype

    adapter_dir = resolve_adapter(ref_or_dir, registry)
    meta = read_adapter_meta(adapter_dir)
    method = mergeable_method(adapter_dir, meta)
    if nf4_base and not _catalog(method).quantized_base:
        raise MergeError(f"--nf4-base is for adapters trained on a 4-bit base (qlora); this one is a {method} adapter")
    base = base or meta.get("base_model") or "smollm2-135m-instruct"
    dtype = dtype or stored_dtype(check_base(base, meta))
    session, prompts, reference = load_reference(adapter_dir, base, dtype, nf4_base)
    merged = fold(session.model).to(resolve_dtype(dtype))
    prompting = Prompting(session.system_prompt, session.chat_template,
                          tuple(session.tokenizer.convert_ids_to_tokens(session.stop_ids)))
    diff: list[Diff] = []

    def write(staging: Path) -> None:
        save_merged(merged, session, staging)
        free_weights(merged)
        diff.append(compare_reloaded(staging, dtype, prompts, reference))
        lineage = merged_lineage(meta, ref_or_dir, adapter_dir, method, dtype, prompting, diff[0], nf4_base)
        (staging / "peftkit.json").write_text(json.dumps(lineage, indent=2, default=str) + "\n", encoding="utf-8")

    out = write_folder(Path(out), write)
    log(f"merged {method} adapter {adapter_dir} into {base} ({dtype}): {out}")
    log(f"verified against base + adapter: {diff[0]}")
    result = MergeResult(out, method, dtype, diff[0])
    if _catalog(method).quantized_base:
        result.nf4_gap = nf4_gap(adapter_dir, base, dtype, prompts, reference)
        log(f"for information, the NF4-base model it was trained as lies {result.nf4_gap.relative:.3g} of the logit scale "
            "away" + ("" if nf4_base else " (the rounding of the 4-bit base, not a merge error; --nf4-base merges into it)"))
    if register:
        result.registry_ref = register_folder(out, register, registry)
        log(f"registered: {result.registry_ref}")
    return result


def load_reference(adapter_dir: Path, base: str, dtype: str, nf4_base: bool):
    """Return (the base + adapter session in fp32, the sample prompts, its logits on them): what the merge must match."""
    from peftkit.generate import load_session

    session = load_session(str(adapter_dir), base=base, dtype=dtype)
    # Upcasting bf16/fp16 weights is exact; computing both sides in fp32 makes the check measure the merge
    # (one rounding of W + dW to the dtype) rather than the noise of bf16 arithmetic (docs/merge.md).
    session.model.float()
    if nf4_base:
        round_trip_nf4(session.model)
    prompts = sample_prompts(session.tokenizer, session.system_prompt, session.chat_template)
    return session, prompts, logits_for(session.model, prompts)


def register_folder(folder: Path, name: str, registry: str | None) -> str:
    """Return the registry reference of the folder added under name."""
    from peftkit.registry import Registry

    with Registry(registry) as reg:
        return reg.add(folder, name=name).ref


def mergeable_method(adapter_dir: Path, meta: dict) -> str:
    """Return the adapter's method name, or raise MergeError saying why it cannot be merged and what to do."""
    from peftkit.methods import read_adapter_config
    from peftkit.methods.catalog import method_of
    from peftkit.methods.full import is_full_finetune

    if is_full_finetune(adapter_dir):  # a full fine-tune, or a folder merge already wrote
        raise MergeError(f"{adapter_dir} is already a full model (config.json + model.safetensors), there is no adapter to "
                         "merge: use the folder as it is (peftkit generate --adapter DIR, peftkit export gguf DIR)")
    method = meta.get("method") or method_of(read_adapter_config(adapter_dir))
    record = _catalog(method)
    if record is None:
        raise MergeError(f"{adapter_dir} holds a {method!r} adapter, a method peftkit does not train or merge; "
                         "merge it with peft directly (PeftModel.from_pretrained(...).merge_and_unload())")
    if not record.mergeable:
        raise MergeError(f"a {method} adapter cannot be merged: {WHY_NOT[record.serve_kind]}")
    return method


def check_base(base: str, meta: dict) -> Path:
    """Return the base's folder after checking it is the base the adapter was trained on (when the lineage says)."""
    from peftkit.fingerprint import base_fingerprint
    from peftkit.models import resolve_model

    base_dir = resolve_model(base)
    recorded = meta.get("base_fingerprint")
    if recorded and base_fingerprint(base_dir) != recorded:
        raise MergeError(f"the adapter was trained on base {recorded[:19]}… but {base} is {base_fingerprint(base_dir)[:19]}…; "
                         "merging into another base gives another model: pass --base with the base it was trained on")
    return base_dir


def stored_dtype(model_dir: Path) -> str:
    """Return the dtype key (fp32, bf16, fp16) the model folder's weights are stored in; fp32 when unstated."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return DTYPE_KEYS.get(str(config.get("dtype") or config.get("torch_dtype")), "fp32")


def fold(model):
    """Return the plain transformers model with the adapter's update added into the base weights."""
    return model.merge_and_unload(safe_merge=True)


def round_trip_nf4(model) -> None:
    """Replace each base linear weight by its NF4 round trip: the weights a QLoRA adapter was trained against.

    The same quantization as models.load_base(quantize_4bit=True) (NF4, blocks of 64, double quantization; lm_head
    stays unquantized), so merging then gives the model as trained, not the adapter on the original base.
    """
    from bitsandbytes import functional as bnb

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name and not name.endswith("lm_head"):
            packed, state = bnb.quantize_4bit(module.weight.data, blocksize=64, compress_statistics=True, quant_type="nf4")
            module.weight.data = bnb.dequantize_4bit(packed, state).to(module.weight.dtype)


def save_merged(model, session, folder: Path) -> None:
    """Write the merged model, its tokenizer with the training chat template and its stop tokens into folder."""
    tokenizer = session.tokenizer
    if session.chat_template:
        tokenizer.chat_template = session.chat_template
    generation = model.generation_config
    generation.eos_token_id = list(session.stop_ids)
    generation.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generation.save_pretrained(folder)


def sample_prompts(tokenizer, system_prompt: str | None, chat_template: str | None) -> list[list[int]]:
    """Return the token ids of the sample conversations, rendered as training rendered its data."""
    from peftkit.data import build_prompt_ids

    return [build_prompt_ids(tokenizer, list(c), system_prompt=system_prompt, chat_template=chat_template)
            for c in SAMPLE_CONVERSATIONS]


@torch.inference_mode()
def logits_for(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Return each prompt's logits at every position, in fp32 on the CPU (one prompt at a time: no padding)."""
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([p], device=device)).logits[0].float().cpu() for p in prompts]


def compare(reference: list[torch.Tensor], other: list[torch.Tensor], tolerance: float) -> Diff:
    """Return how far other's logits lie from reference's."""
    max_abs = max(float((a - b).abs().max()) for a, b in zip(reference, other))
    scale = max(float(a.abs().max()) for a in reference)
    return Diff(max_abs, max(scale, 1e-6), tolerance, sum(a.shape[0] for a in reference))


def check_within(diff: Diff, what: str) -> Diff:
    """Return diff, or raise VerificationError when it is beyond its tolerance (or not a number)."""
    if not diff.relative <= diff.tolerance:  # also catches NaN
        raise VerificationError(f"{what} FAILED: {diff}. Nothing was written; report this with the command line")
    return diff


def compare_reloaded(folder: Path, dtype: str, prompts: list[list[int]], reference: list[torch.Tensor]) -> Diff:
    """Return the checked difference between the model reloaded from folder and the reference logits."""
    from peftkit.models import load_base, resolve_dtype

    model = load_base(str(folder), dtype=dtype).float()
    diff = compare(reference, logits_for(model, prompts), TOLERANCE[resolve_dtype(dtype)])
    return check_within(diff, "merged model (reloaded) vs base + adapter")


def nf4_gap(adapter_dir: Path, base: str, dtype: str, prompts: list[list[int]], reference: list[torch.Tensor]) -> Diff:
    """Return how far the adapter on the NF4 base's weights (as trained) lies from the reference logits.

    The 4-bit base is dequantized and run in fp32, so this measures the weights' rounding alone, not the
    arithmetic of bitsandbytes' 4-bit kernels (on CPU they round activations to bf16).
    """
    from peftkit.methods import load_adapter
    from peftkit.models import load_base, resolve_dtype

    model = load_adapter(load_base(base, dtype=dtype, quantize_4bit=True).dequantize().float(), adapter_dir)
    return compare(reference, logits_for(model, prompts), TOLERANCE[resolve_dtype(dtype)])


def merged_lineage(meta: dict, ref_or_dir: str, adapter_dir: Path, method: str, dtype: str, prompting: Prompting,
                   diff: Diff, nf4_base: bool = False) -> dict:
    """Return the merged folder's peftkit.json: a full model on the adapter's base, and what it was merged from."""
    is_ref = not Path(ref_or_dir).expanduser().is_dir()
    return {
        "peftkit_version": __version__,
        "method": "full",
        "base_model": meta.get("base_model"),
        "base_fingerprint": meta.get("base_fingerprint"),
        "base_config": meta.get("base_config"),
        "config": meta.get("config"),
        "prompting": prompting.to_dict(),
        "metrics": meta.get("metrics"),
        "parent": ref_or_dir if is_ref else str(Path(adapter_dir).resolve()),
        "merged_from": {"adapter": ref_or_dir, "method": method, "dtype": dtype, "nf4_base": nf4_base,
                        "max_abs_logit_diff": diff.max_abs, "relative": diff.relative, "tolerance": diff.tolerance},
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def free_weights(model) -> None:
    """Free a model's weights before the next one loads (peak memory is one model, not two)."""
    for param in model.parameters():
        param.data = torch.empty(0, dtype=param.dtype)


def _catalog(method: str):
    from peftkit.methods.catalog import CATALOG

    return CATALOG.get(method)
