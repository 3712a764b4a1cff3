"""Check an adapter from its safetensors headers alone: no tensor data is read, no pickle is ever loaded.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw data. Reading the header tells us every tensor's shape,
which is all the shape checks against the base model's config need.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from peftkit.methods.catalog import CATALOG, method_of
from peftkit.registry.errors import AdapterValidationError, PickleRefusedError
from peftkit.registry.llama_shapes import check_full, check_peft, dims
from peftkit.registry.peft_config import check_against_tensors, check_config, short

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_HEADER = 100 * 1024 * 1024  # the same bound the safetensors library enforces
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
DEFAULT_MAX_RANK = 256
CONVERT_HINT = ("convert it first: load it in Python you trust and call "
                "safetensors.torch.save_file(state_dict, 'adapter_model.safetensors'), or re-save with save_pretrained()")


@dataclass(frozen=True)
class Tensor:
    """One tensor as its header describes it."""

    dtype: str
    shape: tuple[int, ...]


def refuse_pickles(relpaths: list[str], where: str) -> None:
    """Raise PickleRefusedError when any path is a pickle-based weights file; nothing is opened."""
    bad = [p for p in relpaths if p.lower().endswith(PICKLE_SUFFIXES)]
    if bad:
        raise PickleRefusedError(
            f"{where}: {', '.join(bad)} is a pickle file; peftkit never loads pickle (it can run arbitrary code). "
            f"Only .safetensors is accepted; {CONVERT_HINT}")


def read_header(path: Path, label: str) -> dict[str, Tensor]:
    """Return {tensor name: Tensor} from a safetensors file's header, after checking it is well formed."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        _refuse_disguised_pickle(head, label)
        if len(head) < 8:
            raise AdapterValidationError(f"{label}: {size} bytes is too short for a safetensors file; re-save it")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise AdapterValidationError(f"{label}: header length {length} does not fit in the {size}-byte file; the file is truncated or not safetensors")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # RecursionError: nested thousands deep, as no tensor header is
        raise AdapterValidationError(f"{label}: the header is not valid JSON; the file is corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise AdapterValidationError(f"{label}: the header must be a JSON object of tensors")
    header.pop("__metadata__", None)
    data_len = size - 8 - length
    return {name: _tensor(label, name, info, data_len) for name, info in header.items()}


def validate_files(files: dict[str, Path], base_config: dict | None, max_rank: int = DEFAULT_MAX_RANK) -> dict:
    """Return what the headers say ({kind, method, peft_type, rank, tensors}); raise AdapterValidationError on any misfit."""
    refuse_pickles(list(files), "adapter")
    if "adapter_config.json" in files:
        return _validate_peft(files, base_config, max_rank)
    weights = sorted(p for p in files if "/" not in p and p.startswith("model") and p.endswith(".safetensors"))
    if "config.json" in files and weights:
        return _validate_full(files, weights, base_config)
    raise AdapterValidationError(
        "not an adapter: expected adapter_config.json + adapter_model.safetensors (a PEFT adapter) "
        "or config.json + model*.safetensors (a full fine-tune); found " + (", ".join(sorted(files)) or "no files"))


def load_json(path: Path, label: str) -> dict:
    """Return a JSON object read from a file, or raise AdapterValidationError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers bad UTF-8 and bad JSON
        raise AdapterValidationError(f"{label}: not valid JSON ({exc}); re-save it") from None
    except RecursionError:
        raise AdapterValidationError(f"{label}: not valid JSON (nested too deeply); re-save it") from None
    if not isinstance(value, dict):
        raise AdapterValidationError(f"{label}: must hold a JSON object, got {type(value).__name__}")
    return value


def check_types(record: dict, types: dict[str, type], label: str, fix: str) -> None:
    """Raise AdapterValidationError naming the first field of record whose value is neither None nor of its type."""
    for key, kind in types.items():
        value = record.get(key)
        if value is not None and not isinstance(value, kind):
            what = {str: "a string", dict: "a JSON object", int: "a whole number"}.get(kind, kind.__name__)
            raise AdapterValidationError(f"{label}: {key} must be {what}, got {type(value).__name__} {short(value)}; {fix}")


def check_method(method: object, info: dict, label: str) -> None:
    """Raise AdapterValidationError when a recorded method name disagrees with what the adapter's files are."""
    if method is None or method == info["method"]:
        return
    found, named = CATALOG[info["method"]], CATALOG.get(method) if isinstance(method, str) else None
    if named is None or (named.peft_types, named.serve_kind) != (found.peft_types, found.serve_kind):
        why = f"adapter_config.json peft_type={info['peft_type']}" if info["peft_type"] else "config.json + model*.safetensors"
        if info["peft_type"] == "LORA":  # lora and dora differ only here, and the server runs them differently
            why += f", use_dora={'true' if info['method'] == 'dora' else 'false'}"
        raise AdapterValidationError(f"{label}: method={short(method)} but the adapter's files are a {info['method']} "
                                     f"adapter ({why}); set method to {info['method']!r} or remove it")


# ---------------------------------------------------------------- internals

def _validate_peft(files: dict[str, Path], base_config: dict | None, max_rank: int) -> dict:
    adapter_config = load_json(files["adapter_config.json"], "adapter_config.json")
    if "adapter_model.safetensors" not in files:
        raise AdapterValidationError("adapter_config.json is there but adapter_model.safetensors is missing; save the adapter with save_pretrained()")
    peft_type = check_config(adapter_config)
    tensors = read_header(files["adapter_model.safetensors"], "adapter_model.safetensors")
    method = method_of(adapter_config)
    problems, rank = check_peft(peft_type, tensors, adapter_config, base_config, max_rank)
    _raise_problems("adapter_model.safetensors", problems)
    layers = dims(base_config)["layers"] if base_config is not None else None
    _raise_problems("adapter_config.json", check_against_tensors(peft_type, adapter_config, tensors, layers))
    return {"kind": "peft", "method": method, "peft_type": peft_type, "rank": rank, "tensors": len(tensors)}


def _validate_full(files: dict[str, Path], weights: list[str], base_config: dict | None) -> dict:
    own = load_json(files["config.json"], "config.json")
    count = 0
    problems: list[str] = []
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        if base_config is not None and key in base_config and own.get(key) != base_config[key]:
            problems.append(f"config.json {key}={own.get(key)} but the base model has {key}={base_config[key]}")
    for name in weights:
        tensors = read_header(files[name], name)
        count += len(tensors)
        problems += [f"{name}: {p}" for p in check_full(tensors, base_config or own)]
    _raise_problems("full fine-tune", problems)
    return {"kind": "full", "method": method_of(None), "peft_type": None, "rank": None, "tensors": count}


def _raise_problems(label: str, problems: list[str]) -> None:
    if not problems:
        return
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    raise AdapterValidationError(f"{label}: " + "; ".join(problems[:5]) + more)


def _refuse_disguised_pickle(head: bytes, label: str) -> None:
    # torch.save writes a zip (PK..) or a raw pickle (0x80 + protocol); neither is safetensors.
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise PickleRefusedError(f"{label}: this is a torch/pickle file under a .safetensors name; it is never loaded; {CONVERT_HINT}")


def _tensor(label: str, name: str, info: object, data_len: int) -> Tensor:
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise AdapterValidationError(f"{label}: tensor {name} has no dtype in the header; the file is corrupt")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise AdapterValidationError(f"{label}: tensor {name} has shape {shape!r}; the file is corrupt")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len):
        raise AdapterValidationError(f"{label}: tensor {name} has byte range {offsets!r} outside the {data_len} data bytes; the file is truncated or corrupt")
    width = DTYPE_BYTES.get(info["dtype"])
    if width is not None and offsets[1] - offsets[0] != width * math.prod(shape):
        raise AdapterValidationError(
            f"{label}: tensor {name} ({info['dtype']} {shape}) needs {width * math.prod(shape)} bytes but its range holds {offsets[1] - offsets[0]}")
    return Tensor(info["dtype"], tuple(shape))
