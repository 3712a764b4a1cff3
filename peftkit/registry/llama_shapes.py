"""Which tensor shapes a Llama base model allows, for each adapter family; problems come back as sentences.

Shapes are given as (in, out) per module, the way LoRA sees them: lora_A is [r, in], lora_B is
[out, r], a full Linear weight is [out, in] and an Embedding weight is [vocab, hidden].
"""
from __future__ import annotations

import re
from typing import Any

from peftkit.methods.catalog import CATALOG
from peftkit.registry.errors import AdapterValidationError

# `base_model.model.` is what peft prefixes; `model.` is the LlamaForCausalLM body.
SITE_RE = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?"
    r"(?:layers\.(?P<layer>\d+)\.(?:(?P<block>self_attn|mlp)\.)?)?"
    r"(?P<module>q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|lm_head|embed_tokens|"
    r"input_layernorm|post_attention_layernorm|norm)\.(?P<rest>.+)$")
BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp", "input_layernorm": None, "post_attention_layernorm": None}
PART_RE = re.compile(
    r"^(?:(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|ia3_l)(?:\.[A-Za-z0-9_-]+)??(?:\.weight)?"
    r"|(?:base_layer\.|original_module\.|modules_to_save\.[A-Za-z0-9_-]+\.)?(?P<full>weight|bias))$")
NORMS = ("input_layernorm", "post_attention_layernorm", "norm")
# Where the sizes come from, for error messages: the sources in the order `registry add` prefers them.
BASE_CONFIG = "the base model's config (--base-config FILE, --base-model DIR's config.json, or base_config in peftkit.json)"
MAX_LAYERS = 10_000  # the deepest Llama-style models have a few hundred
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _peft_types(*methods: str) -> frozenset[str]:
    """Return the peft_type values the catalog records for these methods."""
    return frozenset(t for m in methods for t in CATALOG[m].peft_types)


# Which shape check fits which adapter; the peft_type strings themselves live in the method catalog.
SITE_TYPES = _peft_types("lora", "ia3")              # tensors at Llama module sites: lora_A/B, magnitudes, ia3_l
VIRTUAL_TYPES = _peft_types("prefix", "prompt")      # one prompt_embeddings tensor of virtual tokens
PROMPT_TYPES = _peft_types("prompt")                 # ... holding soft prompts (a prefix holds keys and values)
BOTTLENECK_TYPES = _peft_types("bottleneck")         # peftkit's own down/up projections per layer


def dims(config: dict[str, Any]) -> dict[str, int]:
    """Return the sizes that fix every Llama tensor shape, read from an HF config.json dict."""
    missing = [k for k in SIZE_KEYS if k not in config]
    if missing:
        raise AdapterValidationError(f"{BASE_CONFIG} lacks {', '.join(missing)}; pass the base model's own config.json")
    for key in (*SIZE_KEYS, "num_key_value_heads", "head_dim"):
        value = config.get(key)
        optional = key not in SIZE_KEYS and value is None  # head_dim and num_key_value_heads may be null
        if not optional and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise AdapterValidationError(f"{BASE_CONFIG}: {key} must be a whole number above 0, got {value!r}; "
                                         "pass the base model's own config.json")
    if config["num_hidden_layers"] > MAX_LAYERS:  # the target check walks every layer: a made-up count must not
        raise AdapterValidationError(f"{BASE_CONFIG}: num_hidden_layers={config['num_hidden_layers']} is not a real "
                                     f"model's (at most {MAX_LAYERS}); pass the base model's own config.json")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {"hidden": config["hidden_size"], "inter": config["intermediate_size"], "layers": config["num_hidden_layers"],
            "q": heads * head_dim, "kv": (config.get("num_key_value_heads") or heads) * head_dim, "vocab": config["vocab_size"]}


def module_io(module: str, d: dict[str, int]) -> tuple[int, int]:
    """Return (in_features, out_features) of a Llama module (vocab, hidden for the embedding)."""
    return {"q_proj": (d["hidden"], d["q"]), "k_proj": (d["hidden"], d["kv"]), "v_proj": (d["hidden"], d["kv"]),
            "o_proj": (d["q"], d["hidden"]), "gate_proj": (d["hidden"], d["inter"]), "up_proj": (d["hidden"], d["inter"]),
            "down_proj": (d["inter"], d["hidden"]), "lm_head": (d["hidden"], d["vocab"]),
            "embed_tokens": (d["vocab"], d["hidden"])}.get(module, (d["hidden"], d["hidden"]))


def check_peft(peft_type: str, tensors: dict, adapter_config: dict, base_config: dict | None, max_rank: int) -> tuple[list[str], int | None]:
    """Return (problems, rank) for a PEFT adapter's tensors; without a base config only self-consistency is checked."""
    d = dims(base_config) if base_config is not None else None
    if peft_type in SITE_TYPES:
        return _check_sites(tensors, d, max_rank)
    if peft_type in VIRTUAL_TYPES:
        return _check_prompt(peft_type, tensors, adapter_config, d), None
    if peft_type in BOTTLENECK_TYPES and d is not None:
        return _check_bottleneck(tensors, d), None
    return [], None  # another peft type: the header itself was checked, the shapes cannot be


def check_full(tensors: dict, config: dict) -> list[str]:
    """Return problems with a full fine-tune's weights against a Llama config."""
    problems, _ = _check_sites(tensors, dims(config), max_rank=0, full_only=True)
    return problems


# ---------------------------------------------------------------- internals

def _shape(name: str, found: tuple, expected: tuple, why: str) -> str:
    return f"tensor {name} has shape {list(found)}, expected {list(expected)} ({why})"


def _check_sites(tensors: dict, d: dict | None, max_rank: int, full_only: bool = False) -> tuple[list[str], int | None]:
    problems: list[str] = []
    ranks: dict[tuple, dict[str, int]] = {}
    for name, t in tensors.items():
        site = SITE_RE.match(name)
        part = PART_RE.match(site["rest"]) if site else None
        if not site or not part or (full_only and part["part"]):
            problems.append(f"tensor {name} is not a Llama {'weight' if full_only else 'adapter tensor'} "
                            "(expected e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)")
            continue
        module, layer = site["module"], site["layer"]
        if layer is not None and d is not None and int(layer) >= d["layers"]:
            problems.append(f"tensor {name}: layer {layer} does not exist; the base model has {d['layers']} layers (0-{d['layers'] - 1})")
        if (layer is None) != (module in ("lm_head", "embed_tokens", "norm")) or BLOCK.get(module, site["block"]) != site["block"]:
            problems.append(f"tensor {name}: {module} does not sit there in a Llama model")
            continue
        kind = part["part"] or part["full"]
        if kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            ranks.setdefault((layer, module), {})[kind[-1]] = t.shape[0 if kind.endswith("A") else -1] if t.shape else -1
        problem = _check_part(name, module, kind, t.shape, d)
        if problem:
            problems.append(problem)
    rank = _check_ranks(ranks, max_rank, problems)
    return problems, rank


def _check_part(name: str, module: str, kind: str, shape: tuple, d: dict | None) -> str | None:
    if kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") and len(shape) != 2:
        return f"tensor {name} has shape {list(shape)}, expected 2 dimensions"
    if d is None:
        return None
    n_in, n_out = module_io(module, d)
    if module in NORMS:
        expected = {"weight": (d["hidden"],), "bias": (d["hidden"],)}.get(kind)
        return None if expected == shape else _shape(name, shape, expected or (), f"{module} is hidden_size={d['hidden']} wide")
    if kind in ("lora_A", "lora_embedding_A") and shape[1] != n_in:
        return _shape(name, shape, (shape[0], n_in), f"lora_A is [rank, in] and {module} takes {n_in} inputs")
    if kind in ("lora_B", "lora_embedding_B") and shape[0] != n_out:
        return _shape(name, shape, (n_out, shape[1]), f"lora_B is [out, rank] and {module} gives {n_out} outputs")
    if kind == "lora_magnitude_vector" and shape != (n_out,):
        return _shape(name, shape, (n_out,), f"DoRA magnitude is one value per output of {module}")
    if kind == "ia3_l" and shape not in ((n_out, 1), (1, n_in)):
        return _shape(name, shape, (n_out, 1), f"IA3 scales {module}'s outputs, or [1, {n_in}] for a feed-forward input")
    if kind == "weight":
        expected = (n_in, n_out) if module == "embed_tokens" else (n_out, n_in)
        return None if shape == expected else _shape(name, shape, expected, f"the {module} weight of the base model")
    if kind == "bias" and shape != (n_out,):
        return _shape(name, shape, (n_out,), f"{module} has {n_out} outputs")
    return None


def _check_ranks(ranks: dict, max_rank: int, problems: list[str]) -> int | None:
    found = set()
    for (layer, module), sides in sorted(ranks.items(), key=lambda kv: (kv[0][1], int(kv[0][0] or -1))):
        where = f"{module}" + (f" in layer {layer}" if layer is not None else "")
        if set(sides) != {"A", "B"}:
            problems.append(f"{where} has lora_{'A' if 'A' in sides else 'B'} but no lora_{'B' if 'A' in sides else 'A'}; the file is incomplete")
        elif sides["A"] != sides["B"]:
            problems.append(f"{where}: lora_A has rank {sides['A']} but lora_B has rank {sides['B']}; they must match")
        found.update(sides.values())
    rank = max(found) if found else None
    if rank is not None and rank > max_rank:
        problems.append(f"rank {rank} is above the limit of {max_rank}; pass --max-rank {rank} (or max_rank={rank}) if it is intended")
    return rank


def _check_prompt(peft_type: str, tensors: dict, cfg: dict, d: dict | None) -> list[str]:
    emb = tensors.get("prompt_embeddings")
    if emb is None or len(emb.shape) != 2:
        return [f"{peft_type} adapter needs one 2-D tensor prompt_embeddings, found {', '.join(tensors) or 'none'}"]
    rows = cfg.get("num_virtual_tokens", 0) * (cfg.get("num_transformer_submodules") or 1)
    problems = [] if not rows or emb.shape[0] == rows else [
        _shape("prompt_embeddings", emb.shape, (rows, emb.shape[1]), "num_virtual_tokens x num_transformer_submodules rows")]
    if d is None:
        return problems
    if peft_type in PROMPT_TYPES:
        if emb.shape[1] != d["hidden"]:
            problems.append(_shape("prompt_embeddings", emb.shape, (emb.shape[0], d["hidden"]), f"soft prompts are hidden_size={d['hidden']} wide"))
        return problems
    widths = {2 * d["layers"] * w for w in (d["hidden"], d["kv"])}
    if emb.shape[1] not in widths:
        problems.append(_shape("prompt_embeddings", emb.shape, (emb.shape[0], 2 * d["layers"] * d["kv"]),
                               f"a prefix holds keys and values for {d['layers']} layers"))
    return problems


def _check_bottleneck(tensors: dict, d: dict) -> list[str]:
    # Our own bottleneck modules project hidden -> bottleneck -> hidden; each matrix touches hidden_size.
    problems = []
    for name, t in tensors.items():
        layer = re.search(r"layers\.(\d+)\.", name)
        if layer and int(layer[1]) >= d["layers"]:
            problems.append(f"tensor {name}: layer {layer[1]} does not exist; the base model has {d['layers']} layers")
        if len(t.shape) == 2 and d["hidden"] not in t.shape:
            problems.append(f"tensor {name} has shape {list(t.shape)}; one side must be hidden_size={d['hidden']}")
    return problems
