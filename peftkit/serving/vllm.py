"""The vLLM launch for a registry's LoRA adapters: which adapters vLLM can take, which not and why, and the command.

vLLM serves LoRA adapters in the standard PEFT layout, with limits its loader enforces
(vllm/lora/peft_helper.py, vllm/config/lora.py): max_lora_rank is one of 1, 8, 16, 32, 64, 128,
256, 320, 512 and every adapter's rank must fit it; no DoRA; modules_to_save must be empty; no
bias; and adapters whose init rewrote the base weights (PiSSA, OLoRA, CorDA) cannot apply to the
stock base. Prefix, prompt, IA3 and bottleneck adapters are not LoRA and vLLM has no loader for them.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.methods.catalog import CATALOG, method_names
from peftkit.serving.errors import ServingError
from peftkit.serving.settings import default_served_name

VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA_METHODS = method_names(vllm=True)  # the methods vLLM serves (as LoRA adapters)
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "eva", "loftq")


@dataclass
class VllmPlan:
    """The vLLM command line and, per registry reference, whether it is served and why not."""

    argv: list[str]
    served: list[tuple[str, str]] = field(default_factory=list)
    """(model id clients send, checkout folder)."""
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """(registry reference, reason vLLM cannot take it)."""
    max_lora_rank: int = 0

    def command(self) -> str:
        """Return the command as one shell line."""
        return shlex.join(self.argv)


def vllm_problems(adapter_config: dict[str, Any], max_rank: int = VLLM_MAX_RANKS[-1]) -> list[str]:
    """Return why vLLM would refuse an adapter_config.json (empty when it can serve it)."""
    problems = []
    if adapter_config.get("peft_type") != "LORA":
        problems.append(f"peft_type {adapter_config.get('peft_type')!r} is not LORA: vLLM serves LoRA adapters only")
        return problems
    if adapter_config.get("use_dora"):
        problems.append("DoRA: vLLM does not support DoRA (serve it with `peftkit serve`, or merge it into the base)")
    if adapter_config.get("modules_to_save"):
        problems.append(f"modules_to_save={adapter_config['modules_to_save']}: vLLM takes adapters without fully trained modules")
    if adapter_config.get("bias", "none") != "none" or adapter_config.get("lora_bias"):
        problems.append("trained biases: vLLM does not support adapter bias")
    init = adapter_config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        problems.append(f"init_lora_weights={init!r} changes the base weights, so the adapter does not apply to the stock base")
    ranks = [int(adapter_config.get("r") or 0)] + [int(v) for v in (adapter_config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        problems.append(f"rank {max(ranks)} is above the max LoRA rank {max_rank}")
    return problems


def build_vllm_launch(registry, base_model: str, served_name: str, *, base_fingerprint: str | None = None,
                      host: str = "127.0.0.1", port: int = 8000, max_loras: int = 8, max_lora_rank: int | None = None,
                      all_versions: bool = False, dtype: str = "auto") -> VllmPlan:
    """Return the VllmPlan serving every LoRA adapter of the registry vLLM can take (latest and tagged versions).

    No --api-key in the command: vLLM reads VLLM_API_KEY from its environment, which keeps the key out
    of the process list and of shell history.
    """
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_RANKS:
        raise ServingError(f"--max-lora-rank={max_lora_rank}: vLLM accepts one of {', '.join(map(str, VLLM_MAX_RANKS))}")
    cap = max_lora_rank or VLLM_MAX_RANKS[-1]
    entries = registry.list()
    latest: dict[str, int] = {}
    for e in entries:
        latest[e.name] = max(latest.get(e.name, 0), e.version)
    plan = VllmPlan(argv=[])
    ranks = []
    for e in entries:
        is_latest = e.version == latest[e.name]
        if not (all_versions or is_latest or e.tags):
            continue
        reasons = _entry_problems(registry, e, cap, base_fingerprint)
        if reasons:
            plan.rejected.append((e.ref, "; ".join(reasons)))
            continue
        folder = str(Path(registry.checkout(e.ref)).resolve())
        ranks.append(_max_rank(folder))
        ids = [e.ref] + [f"{e.name}:{t}" for t in e.tags] + ([e.name] if is_latest else [])
        plan.served += [(i, folder) for i in ids]
    plan.max_lora_rank = max_lora_rank or next((r for r in VLLM_MAX_RANKS if r >= max(ranks, default=1)), VLLM_MAX_RANKS[-1])
    argv = ["vllm", "serve", base_model, "--served-model-name", served_name, "--host", host, "--port", str(port),
            "--dtype", {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, "auto")]
    if plan.served:
        distinct = len({folder for _, folder in plan.served})
        argv += ["--enable-lora", "--max-lora-rank", str(plan.max_lora_rank), "--max-loras", str(max(1, min(max_loras, distinct))),
                 "--max-cpu-loras", str(max(distinct, 1)), "--lora-modules"]
        argv += [f"{model_id}={folder}" for model_id, folder in plan.served]
    plan.argv = argv
    return plan


def _entry_problems(registry, entry, cap: int, base_fingerprint: str | None) -> list[str]:
    method = CATALOG.get((entry.method or "").lower())
    # Every method saved as a peft LORA adapter gets the detailed check, so DoRA is told why vLLM refuses it.
    if method is None or "LORA" not in method.peft_types:
        return [f"method {entry.method!r}: vLLM serves LoRA adapters only ({', '.join(LORA_METHODS)})"]
    if base_fingerprint and entry.base_fingerprint and entry.base_fingerprint != base_fingerprint:
        return [f"trained on another base ({entry.base_model}) than the one launched"]
    if entry.rank and entry.rank > cap:
        return [f"rank {entry.rank} is above the max LoRA rank {cap}"]
    folder = Path(registry.checkout(entry.ref))
    return vllm_problems(json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")), cap)


def _max_rank(folder: str) -> int:
    config = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    return max([int(config.get("r") or 0)] + [int(v) for v in (config.get("rank_pattern") or {}).values()])


def plan_for_registry(base: str, registry_path: str | None = None, *, served_name: str | None = None,
                      **kwargs: Any) -> VllmPlan:
    """Return the VllmPlan for a base model name (alias, folder or hub id) and a registry folder."""
    from peftkit.fingerprint import base_fingerprint
    from peftkit.models import BUNDLED, resolve_model
    from peftkit.registry import Registry

    local = Path(base).expanduser()
    if base in BUNDLED or local.exists():
        model_dir = resolve_model(base)  # vLLM needs a folder it can read: the converted safetensors one
        launch, fingerprint = str(Path(model_dir).resolve()), base_fingerprint(model_dir)
    else:
        launch, fingerprint = base, None  # a hub id: vLLM downloads it itself
    name = served_name or default_served_name(base)
    return build_vllm_launch(Registry(registry_path), launch, name, base_fingerprint=fingerprint, **kwargs)
