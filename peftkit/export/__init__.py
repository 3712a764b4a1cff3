"""Export a model for other runtimes: `export_gguf` writes a GGUF for llama.cpp and Ollama, then reads it back.

An adapter is merged first (peftkit.merge, verified) into a temporary folder; a merged or full model
folder is exported as it is. The GGUF is written beside its target under a temporary name, loaded back
with transformers' own GGUF reader (which dequantizes it and undoes llama.cpp's q/k permutation), and
compared with the source model on the sample prompts; only a file within the tolerance for its type is
renamed into place. Its tokenizer is checked too: the read-back tokenizer must split the rendered
prompts into the same ids and carry the training chat template.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.merge import Diff

__all__ = ["ExportError", "ExportResult", "GGUF_TYPES", "TOLERANCE", "export_gguf"]

GGUF_TYPES = ("f16", "bf16", "q8_0")
# Largest |logit difference| allowed against the source model, as a fraction of its largest |logit| (docs/merge.md).
TOLERANCE = {"f16": 1e-2, "bf16": 5e-2, "q8_0": 2e-1}


class ExportError(PeftkitError):
    """A model cannot be exported to GGUF (the message says what to use instead)."""


@dataclass
class ExportResult:
    """What export_gguf wrote and how close the file read back to the source model."""

    out: Path
    modelfile: Path
    gguf_type: str
    diff: Diff
    merged_from: str | None = None


def export_gguf(source: str, out: str | Path, *, gguf_type: str = "f16", registry: str | None = None,
                base: str | None = None, tokenizer_pre: str | None = None,
                log: Callable[[str], None] = print) -> ExportResult:
    """Return the result of writing source (an adapter, merged first, or a full model folder) as a checked GGUF."""
    from peftkit.generate import resolve_adapter
    from peftkit.merge import merge
    from peftkit.methods.full import is_full_finetune

    out = Path(out)
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--type {gguf_type!r} is not offered; choose one of {', '.join(GGUF_TYPES)}")
    if out.suffix != ".gguf":
        raise ExportError(f"--out {out}: name the file with a .gguf suffix, e.g. --out model-{gguf_type}.gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = resolve_adapter(source, registry)
    with tempfile.TemporaryDirectory(prefix=".peftkit-export-", dir=out.parent) as tmp:
        merged_from = None if is_full_finetune(folder) else str(folder)
        model_dir = folder if merged_from is None else merge(str(folder), Path(tmp) / "merged", base=base, log=log).out
        result = export_folder(model_dir, out, gguf_type, tokenizer_pre)
    result.merged_from = merged_from
    log(f"wrote {out} ({gguf_type}, {out.stat().st_size / 2**20:.1f} MiB) and {result.modelfile}")
    log(f"read back with transformers: {result.diff}")
    return result


def export_folder(model_dir: Path, out: Path, gguf_type: str, tokenizer_pre: str | None) -> ExportResult:
    """Return the result of writing the model folder as a GGUF at out, checked before it is renamed into place."""
    from transformers import AutoTokenizer

    from peftkit.atomic import atomic_path
    from peftkit.export.gguf_file import write_gguf
    from peftkit.export.modelfile import write_modelfile
    from peftkit.prompting import read_prompting, stop_ids

    prompting = read_prompting(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stops = stop_ids(tokenizer, prompting)
    with atomic_path(out) as tmp:
        write_gguf(model_dir, tmp, gguf_type, chat_template=prompting.chat_template, stop_ids=stops,
                   tokenizer_pre=tokenizer_pre)
        diff = check_gguf(model_dir, tmp, gguf_type, tokenizer, prompting)
    modelfile = write_modelfile(out, tokenizer, prompting, tokenizer.convert_ids_to_tokens(stops))
    return ExportResult(out, modelfile, gguf_type, diff)


def check_gguf(model_dir: Path, gguf_path: Path, gguf_type: str, tokenizer, prompting) -> Diff:
    """Return the logit difference between the GGUF read back by transformers and the source model (checked)."""
    import torch
    from transformers import AutoModelForCausalLM

    from peftkit.merge import compare, check_within, free_weights, logits_for, sample_prompts
    from peftkit.models import load_base

    check_tokenizer(gguf_path, tokenizer, prompting)
    prompts = sample_prompts(tokenizer, prompting.system_prompt, prompting.chat_template)
    source = load_base(str(model_dir), dtype="fp32")
    reference = logits_for(source, prompts)
    free_weights(source)
    # Read the file itself, not models.load_base's cached conversion of it: this is the check of the file.
    exported = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                    config=read_back_config(model_dir, gguf_path))
    diff = compare(reference, logits_for(exported, prompts), TOLERANCE[gguf_type])
    return check_within(diff, f"GGUF ({gguf_type}) read back with transformers vs the model it was written from")


def read_back_config(model_dir: Path, gguf_path: Path):
    """Return the config transformers reads from the GGUF, with Llama 3.1 rope scaling taken from the source.

    llama.cpp carries that scaling in the rope_freqs tensor (written and tested in gguf_file), which
    transformers' GGUF reader does not read; without it the read-back model would rotate differently.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    source = AutoConfig.from_pretrained(model_dir).rope_parameters or {}
    if source.get("rope_type", "default") != "default":
        config.rope_parameters = dict(source)
    return config


def check_tokenizer(gguf_path: Path, tokenizer, prompting) -> None:
    """Raise VerificationError unless the GGUF's tokenizer splits the rendered samples alike and holds the template."""
    from transformers import AutoTokenizer

    from peftkit.data.templates import with_system
    from peftkit.merge import SAMPLE_CONVERSATIONS, VerificationError

    read_back = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    template = prompting.chat_template or tokenizer.chat_template
    if template and read_back.chat_template != template:
        raise VerificationError(f"{gguf_path.name}: the chat template read back differs from the training one")
    for conversation in SAMPLE_CONVERSATIONS:
        messages = with_system(list(conversation), prompting.system_prompt)
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        want, got = tokenizer(text, add_special_tokens=False)["input_ids"], read_back(text, add_special_tokens=False)["input_ids"]
        if want != got:
            raise VerificationError(f"{gguf_path.name}: its tokenizer splits a sample prompt differently ({len(got)} tokens "
                                    f"instead of {len(want)}); the vocabulary or merges were not written as they should be")
