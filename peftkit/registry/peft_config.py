"""adapter_config.json against the adapter's own tensors: a type peftkit runs, field types, the rank, the targets.

peft builds the adapter's layers from the config, then loads the tensors into them: a config whose r,
rank_pattern or target_modules disagree with the tensors fails to load at the first request (a rank
mismatch), or loads with untrained layers and a warning nobody reads (a target without tensors). Here
the config and the safetensors header alone (never the tensor data) are compared, the way peft matches
module names (peft.tuners.tuners_utils.check_target_module_exists, peft.utils.other.get_pattern_key).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Callable

from peftkit.methods.catalog import CATALOG
from peftkit.registry.errors import AdapterValidationError
from peftkit.registry.llama_shapes import PART_RE, SITE_RE

SUPPORTED = {t: ", ".join(m.name for m in CATALOG.values() if t in m.peft_types) for m in CATALOG.values() for t in m.peft_types}
FILE = "adapter_config.json"
REDO = "or re-save the adapter with save_pretrained()"
LINEAR = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
TOP = ("model.embed_tokens", "lm_head")
LLAMA_DEFAULT_TARGETS = {"LORA": ["q_proj", "v_proj"], "IA3": ["k_proj", "v_proj", "down_proj"]}  # peft's, for Llama
PEFT_DEFAULT_RANK = 8


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # v == v: not NaN


def _names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


NAMES = 'a list of module names such as ["q_proj", "v_proj"], or one regular expression'
# field: (check, what it must be, whether null means peft's default). Fields absent from the config are not checked.
FIELDS: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "r": (lambda v: _whole(v) and v > 0, "a whole number above 0, e.g. 16", False),
    "lora_alpha": (_number, "a number, e.g. 32", False),
    "lora_dropout": (lambda v: _number(v) and 0 <= v <= 1, "a number from 0 to 1", False),
    "target_modules": (lambda v: isinstance(v, str) or _names(v), NAMES, True),
    "exclude_modules": (lambda v: isinstance(v, str) or _names(v), NAMES, True),
    "feedforward_modules": (lambda v: isinstance(v, str) or _names(v), NAMES, True),
    "modules_to_save": (_names, 'a list of module names such as ["lm_head"]', True),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(_whole(x) and x > 0 for x in v.values()),
                     'an object of module pattern -> rank, e.g. {"q_proj": 8}', False),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(_number(x) for x in v.values()),
                      'an object of module pattern -> alpha, e.g. {"q_proj": 16}', False),
    "layers_to_transform": (lambda v: _whole(v) or (isinstance(v, list) and all(map(_whole, v))), "a layer index or a list of them", True),
    "layers_pattern": (lambda v: isinstance(v, str) or _names(v), "a string or a list of strings", True),
    "use_dora": (lambda v: isinstance(v, bool), "true or false", False),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false", False),
    "num_virtual_tokens": (lambda v: _whole(v) and v > 0, "a whole number above 0, e.g. 20", False),
    "num_transformer_submodules": (lambda v: _whole(v) and v > 0, "a whole number above 0 (1 for a decoder)", True),
    "base_model_name_or_path": (lambda v: isinstance(v, str), "a string", True),
}


def check_config(config: dict) -> str:
    """Return the config's peft_type (upper case) after checking it names a method peftkit runs and every known field's type."""
    value = config.get("peft_type")
    choices = ", ".join(f"{t} ({m})" for t, m in SUPPORTED.items())
    if value is None or value == "":
        raise AdapterValidationError(f"{FILE}: peft_type is missing; set it to the adapter's type, one of {choices}, {REDO}")
    if isinstance(value, str) and value != value.upper() and value.upper() in SUPPORTED:
        # peft (and peftkit's bottleneck loader) look the type up as written: 'lora' fails at load time.
        raise AdapterValidationError(f"{FILE}: peft_type={value!r} must be written {value.upper()!r}; fix peft_type, {REDO}")
    if not isinstance(value, str) or value not in SUPPORTED:
        raise AdapterValidationError(f"{FILE}: peft_type={short(value)} is not a method peftkit can serve; supported: {choices}. "
                                     "Train the adapter with one of these methods, or keep it outside the registry")
    for key, (ok, what, nullable) in FIELDS.items():
        if key in config and not (config[key] is None and nullable) and not ok(config[key]):
            raise AdapterValidationError(f"{FILE}: {key} must be {what}, got {short(config[key])}; fix {key}, {REDO}")
    return value


def check_against_tensors(peft_type: str, config: dict, tensors: dict, layers: int | None) -> list[str]:
    """Return sentences on how the config's rank and targets disagree with the tensors (empty when they agree).

    layers is the base model's layer count; without it the layers the tensors use are taken as all of them.
    """
    if peft_type not in LLAMA_DEFAULT_TARGETS:  # prompts, prefixes and bottlenecks have their own shape checks
        return []
    sites = adapter_sites(tensors)
    problems = _target_problems(peft_type, config, sites, layers)
    return problems + (_rank_problems(config, sites) if peft_type == "LORA" else [])


def adapter_sites(tensors: dict) -> dict[str, dict[str, tuple]]:
    """Return {module name as peft sees it, e.g. model.layers.0.self_attn.q_proj: {part: shape}} for adapter tensors."""
    sites: dict[str, dict[str, tuple]] = {}
    for name, tensor in tensors.items():
        site = SITE_RE.match(name)
        part = PART_RE.match(site["rest"]) if site else None
        if part and part["part"]:
            layer, module = site["layer"], site["module"]
            if layer is None:
                key = "model.embed_tokens" if module == "embed_tokens" else module if module == "lm_head" else f"model.{module}"
            else:
                key = f"model.layers.{layer}.{site['block'] + '.' if site['block'] else ''}{module}"
            sites.setdefault(key, {})[part["part"]] = tensor.shape
    return sites


# ---------------------------------------------------------------- internals

def _target_problems(peft_type: str, config: dict, sites: dict, layers: int | None) -> list[str]:
    targets = config.get("target_modules")
    if targets is None:
        if config.get("target_parameters"):
            return []  # LoRA on parameters, not modules: nothing to compare by module name
        targets = LLAMA_DEFAULT_TARGETS[peft_type]
    seen = sorted({n for n in map(_layer, sites) if n is not None})
    indices = range(layers) if layers is not None else (seen or [0])
    candidates = [f"model.layers.{i}.{block}.{m}" for i in indices for m, block in LINEAR.items()] + list(TOP)
    wanted = {key for key in candidates if _targeted(key, targets, config)}
    shown = short(targets)
    problems = [f"target_modules={shown} does not target {where}, but adapter_model.safetensors has tensors there; "
                f"add it to target_modules, {REDO}" for where in _grouped(set(sites) - wanted)]
    problems += [f"target_modules={shown} targets {where}, but adapter_model.safetensors has no tensors there (those layers "
                 f"would load untrained); remove it from target_modules, {REDO}" for where in _grouped(wanted - set(sites))]
    return problems


def _targeted(key: str, targets: str | list[str], config: dict) -> bool:
    """Return True when peft would put an adapter layer on module `key` under this config."""
    exclude = config.get("exclude_modules")
    if exclude and (_regex(exclude, "exclude_modules").fullmatch(key) if isinstance(exclude, str) else _listed(key, exclude)):
        return False
    for m in config.get("modules_to_save") or []:
        if _regex(rf"(^|.*\.){m}($|\..*)", "modules_to_save").match(key):
            return False
    if isinstance(targets, str):
        if targets == "all-linear":  # every Linear layer but the output layer
            return key.rsplit(".", 1)[-1] in LINEAR
        return _regex(targets, "target_modules").fullmatch(key) is not None
    if not _listed(key, targets):
        return False
    chosen = config.get("layers_to_transform")
    if chosen is None or chosen == []:
        return True
    layer = _layer(key)
    return layer is not None and (layer == chosen if isinstance(chosen, int) else layer in chosen)


def _rank_problems(config: dict, sites: dict) -> list[str]:
    r = config.get("r", PEFT_DEFAULT_RANK)
    pattern = config.get("rank_pattern") or {}
    wrong: dict[tuple, set[str]] = {}
    for key, parts in sites.items():
        shape = parts.get("lora_A") or parts.get("lora_embedding_A")
        if shape is None or len(shape) != 2:
            continue  # a malformed tensor, reported by the shape checks
        matched = next((p for p in pattern if _regex(rf"(.*\.)?({p})$", "rank_pattern").match(key)), None)
        field, expected = (f"rank_pattern[{matched!r}]", pattern[matched]) if matched is not None else ("r", r)
        if shape[0] != expected:
            wrong.setdefault((field, expected, shape[0]), set()).add(key)
    return [f"{field}={expected} but adapter_model.safetensors has rank {found} for {where} (lora_A is [{found}, ...]); "
            f"set {field} to {found}{' (or give those modules a rank_pattern entry)' if field == 'r' else ''}, {REDO}"
            for (field, expected, found), keys in sorted(wrong.items()) for where in _grouped(keys)]


def _grouped(keys: set[str]) -> list[str]:
    """Return one phrase per module name, e.g. 'q_proj in layers 0-1', 'lm_head'."""
    by_module: dict[str, list[int]] = {}
    for key in keys:
        layer = _layer(key)
        by_module.setdefault(key.rsplit(".", 1)[-1], []).append(-1 if layer is None else layer)
    out = []
    for module, layers in sorted(by_module.items()):
        nums = sorted(n for n in layers if n >= 0)
        if not nums:
            out.append(module)
        elif nums == list(range(nums[0], nums[-1] + 1)) and len(nums) > 1:
            out.append(f"{module} in layers {nums[0]}-{nums[-1]}")
        else:
            out.append(f"{module} in layer{'s' if len(nums) > 1 else ''} {', '.join(map(str, nums))}")
    return out


def _listed(key: str, names: list[str]) -> bool:
    return key in names or any(key.endswith(f".{n}") for n in names)


def _layer(key: str) -> int | None:
    found = re.match(r"model\.layers\.(\d+)\.", key)
    return int(found[1]) if found else None


@lru_cache(maxsize=256)
def _regex(pattern: str, field: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterValidationError(f"{FILE}: {field} holds {short(pattern)}, which is not a valid regular expression ({exc}); "
                                     f"fix {field}, {REDO}") from None


def short(value: object) -> str:
    """Return repr(value), cut to 80 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
