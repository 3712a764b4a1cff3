"""Combine LoRA adapters trained on one base into a new adapter (peft's add_weighted_adapter), checked and registered.

The parents must be LoRA adapters (plain or QLoRA: DoRA's magnitudes are not combined by peft) on the
same base (their lineage's base_fingerprint), trained with the same prompting unless forced. They are
loaded side by side on the base in fp32, combined by peft, and the new adapter is saved, reloaded on a
fresh base and compared with peft's in-memory result before its folder appears.

What the combinations mean for the update dW = scale * B @ A of each parent: `cat` stacks the parents'
A and B, so the mix's update is exactly sum(w_i * dW_i) (its rank is the sum of theirs); `linear`
averages A and B separately with sqrt(w_i * scale_i) each, which is not the sum of the updates (mixing
an adapter with itself at 0.5, 0.5 doubles it); `svd` refits sum(w_i * dW_i) at the largest parent rank;
`ties` and `dare_*` prune to --density first (dare drops at random: the seed is fixed and recorded).
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from peftkit import __version__
from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.merge import Diff

MIXABLE = ("lora", "qlora")
COMBINATIONS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties")  # peft's combination_type names
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties")
SEED = 0


class MixError(PeftkitError):
    """Adapters cannot be mixed; the message names the parent and what differs."""


@dataclass
class MixResult:
    """What mix wrote, how close it reloads to peft's in-memory mix, and where it was registered."""

    out: Path
    diff: Diff
    registry_ref: str | None = None


def parse_weights(text: str | None, count: int) -> list[float]:
    """Return one weight per adapter from "0.5,0.5" (None: equal weights summing to 1)."""
    if text is None:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise MixError(f"--weights {text!r} must be comma-separated numbers, e.g. --weights 0.5,0.5") from None
    if len(weights) != count:
        raise MixError(f"--weights {text!r} gives {len(weights)} weights for {count} adapters; give one per adapter")
    return weights


def mix(refs: list[str], weights: list[float], *, name: str, combination: str = "cat", density: float | None = None,
        out: str | Path | None = None, registry: str | None = None, register: bool = True, force: bool = False,
        log: Callable[[str], None] = print) -> MixResult:
    """Return the result of combining the adapters into a new adapter folder (registered under name unless told not)."""
    from peftkit.atomic import write_folder
    from peftkit.generate import resolve_adapter
    from peftkit.methods import read_adapter_meta
    from peftkit.registry.names import check_name

    check_name(name)
    check_combination(combination, density, len(refs), len(weights))
    parents = [resolve_adapter(r, registry) for r in refs]
    metas = [read_adapter_meta(p) for p in parents]
    prompting = check_parents(refs, parents, metas, force)
    model, prompts, reference = build_mix(metas[0]["base_model"], parents, weights, combination, density, prompting)
    out = Path(out or Path("runs") / name)
    diff: list = []

    def write(staging: Path) -> None:
        model.save_pretrained(staging, selected_adapters=["default"])
        copy_tokenizer(parents[0], staging)
        diff.append(compare_reloaded(staging, metas[0]["base_model"], prompts, reference))
        lineage = mixed_lineage(metas[0], refs, weights, combination, density, prompting, diff[0])
        (staging / "peftkit.json").write_text(json.dumps(lineage, indent=2, default=str) + "\n", encoding="utf-8")

    write_folder(out, write)
    log(f"mixed {len(refs)} adapters ({combination}, weights {', '.join(f'{w:g}' for w in weights)}): {out}")
    log(f"verified against peft's in-memory mix: {diff[0]}")
    result = MixResult(out, diff[0])
    if register:
        from peftkit.merge import register_folder

        result.registry_ref = register_folder(out, name, registry)
        log(f"registered: {result.registry_ref}")
    return result


def check_combination(combination: str, density: float | None, n_refs: int, n_weights: int) -> None:
    """Raise MixError unless the combination, density and counts make a mix."""
    if combination not in COMBINATIONS:
        raise MixError(f"--combination {combination!r} is unknown; choose one of {', '.join(COMBINATIONS)}")
    if n_refs < 2:
        raise MixError("mix needs two or more adapters")
    if n_weights != n_refs:
        raise MixError(f"{n_weights} weights for {n_refs} adapters; give one per adapter")
    if combination in NEEDS_DENSITY and not (density is not None and 0 < density <= 1):
        raise MixError(f"--combination {combination} prunes each update first: give --density in (0, 1], e.g. 0.5")


def check_parents(refs: list[str], parents: list[Path], metas: list[dict], force: bool):
    """Return the parents' common prompting after checking they are LoRA adapters on one base."""
    from peftkit.prompting import read_prompting

    for ref, meta in zip(refs, metas):
        if meta.get("method") not in MIXABLE:
            raise MixError(f"{ref} is a {meta.get('method')} adapter; mix combines LoRA adapters ({', '.join(MIXABLE)}) only")
        if not meta.get("base_fingerprint"):
            raise MixError(f"{ref} has no recorded base (no peftkit.json lineage), so it cannot be shown to share a base "
                           "with the others; mix adapters trained with peftkit or registered with --base-model")
    bases = {meta["base_fingerprint"] for meta in metas}
    if len(bases) > 1:
        listing = "; ".join(f"{r}: {m.get('base_model')} {m['base_fingerprint'][:19]}…" for r, m in zip(refs, metas))
        raise MixError(f"the adapters were trained on different bases ({listing}); an update only means something on its own base")
    records = [read_prompting(p) for p in parents]
    for ref, record in zip(refs[1:], records[1:]):
        if record != records[0] and not force:
            field = next(k for k, v in record.to_dict().items() if v != records[0].to_dict()[k])
            raise MixError(f"{ref} was trained with another {field} than {refs[0]}; the mix would be prompted as {refs[0]} was. "
                           "Pass --force to mix anyway")
    return records[0]


def build_mix(base: str, parents: list[Path], weights: list[float], combination: str, density: float | None, prompting):
    """Return (the base carrying the mix as its "default" adapter, the sample prompts, its logits on them)."""
    import torch

    from peftkit.merge import logits_for, sample_prompts
    from peftkit.methods import load_adapter
    from peftkit.models import load_base, load_tokenizer

    model = load_adapter(load_base(base, dtype="fp32"), parents[0], adapter_name="p0")
    for i, folder in enumerate(parents[1:], start=1):
        model.load_adapter(str(folder), adapter_name=f"p{i}")
    torch.manual_seed(SEED)  # dare_* drop values at random
    names = [f"p{i}" for i in range(len(parents))]
    model.add_weighted_adapter(names, weights, "default", combination_type=combination, density=density)
    fix_rslora_scaling(model, "default")
    model.set_adapter("default")
    for adapter in names:
        model.delete_adapter(adapter)
    prompts = sample_prompts(load_tokenizer(base), prompting.system_prompt, prompting.chat_template)
    return model, prompts, logits_for(model, prompts)


def fix_rslora_scaling(model, adapter: str) -> None:
    """Give the mix the scale 1 peft's combinations assume, also when its config came from an rsLoRA parent.

    add_weighted_adapter copies the first parent's config with lora_alpha = r, which means scale 1, but keeps
    use_rslora, under which the scale would be alpha / sqrt(r) = sqrt(r): the mix would act sqrt(r) times too strongly.
    """
    from peft.tuners.lora import LoraLayer

    config = model.peft_config[adapter]
    if not config.use_rslora:
        return
    config.use_rslora = False
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            module.scaling[adapter] = config.lora_alpha / config.r


def compare_reloaded(folder: Path, base: str, prompts, reference) -> Diff:
    """Return the checked difference between the saved mix on a fresh base and peft's in-memory mix."""
    import torch

    from peftkit.merge import TOLERANCE, check_within, compare, logits_for
    from peftkit.methods import load_adapter
    from peftkit.models import load_base

    model = load_adapter(load_base(base, dtype="fp32"), folder)
    diff = compare(reference, logits_for(model, prompts), TOLERANCE[torch.float32])
    return check_within(diff, "mixed adapter (reloaded) vs peft's in-memory mix")


def copy_tokenizer(parent: Path, folder: Path) -> None:
    """Save the first parent's tokenizer beside the mix, as training saves one beside each adapter."""
    if (parent / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(parent).save_pretrained(folder)


def mixed_lineage(first: dict, refs: list[str], weights: list[float], combination: str, density: float | None,
                  prompting, diff) -> dict:
    """Return the mix's peftkit.json: its base, the first parent's prompting and every parent with its weight."""
    return {
        "peftkit_version": __version__,
        "method": "lora",
        "base_model": first.get("base_model"),
        "base_fingerprint": first.get("base_fingerprint"),
        "base_config": first.get("base_config"),
        "prompting": prompting.to_dict(),
        "metrics": {},
        "parent": None,
        "mix": {"parents": [{"ref": r, "weight": w} for r, w in zip(refs, weights)], "combination": combination,
                "density": density, "seed": SEED, "max_abs_logit_diff": diff.max_abs},
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
