"""Typed run configuration: YAML file + `--set key=value` overrides -> RunConfig.

The YAML key, the dataclass field and the override are one string (`method.rank` everywhere).
Each field is documented by the string literal under it; `field_docs` reads those for help text.
This module never imports torch, so `peftkit --help` and config checks stay instant.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftkit import atomic
from peftkit.errors import PeftkitError
from peftkit.methods.catalog import METHOD_NAMES


class ConfigError(PeftkitError, ValueError):
    """A config value or key is wrong; the message names the key, the value and the fix."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """Base model: the alias smollm2-135m-instruct (bundled), a local HF directory, a .gguf file, or a hub id."""
    dtype: str = "auto"
    """Weights and compute dtype: auto (bf16 where the hardware runs it fast, CPUs with AMX included), bf16, fp16, fp32."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when model.name is a hub id; a commit pins exactly which weights."""
    offline: bool = False
    """Never touch the network for the model: a hub id loads only from the local Hugging Face cache (as HF_HUB_OFFLINE=1)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa (default), eager, or flash_attention_2 where installed."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off: Llama needs none, and it executes arbitrary code."""


@dataclass
class DataConfig:
    path: str | None = None
    """Training data: a .jsonl/.json/.csv/.parquet file, a datasets save_to_disk folder, or a Hugging Face Hub dataset id (ORG/NAME)."""
    split: str = "train"
    """Split of a hub dataset to train on: train, or a slice such as train[:1000] (data.path or data.sources entries)."""
    subset: str | None = None
    """Configuration of a hub dataset that has several (e.g. main for openai/gsm8k)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub dataset; a commit pins exactly which rows train."""
    offline: bool = False
    """Never touch the network for data: a hub dataset loads only from the local datasets cache (as HF_HUB_OFFLINE=1)."""
    format: str = "auto"
    """Row shape: chat, instruction, completion, text, or auto (detect from the first rows)."""
    sources: list[dict] = field(default_factory=list)
    """Several sources mixed: a list of {path, weight, format, columns, split, subset, revision}; used instead of data.path."""
    columns: dict[str, str] = field(default_factory=dict)
    """Rename fields to the names a format expects, e.g. {question: instruction, answer: output}."""
    eval_path: str | None = None
    """Held-out data in its own file; when unset, data.eval_fraction of the training rows is held out."""
    eval_fraction: float = 0.05
    """Share of training rows held out for evaluation when data.eval_path is unset (0 disables eval)."""
    system_prompt: str | None = None
    """System message put first in every conversation that has none (the template's default otherwise)."""
    chat_template: str | None = None
    """A Jinja chat template (text or path to a file) used instead of the tokenizer's own."""
    train_on_inputs: bool = False
    """Also compute loss on prompts and user turns; by default only on what the assistant says."""
    max_seq_length: int = 1024
    """Longest tokenized example; longer ones follow data.length_policy."""
    length_policy: str = "truncate"
    """What to do with examples longer than data.max_seq_length: truncate or drop (both are counted)."""
    packing: bool = False
    """Pack several examples into each sequence, with no attention across example boundaries."""
    cache_dir: str | None = None
    """Where tokenized data is cached by fingerprint (default: $PEFTKIT_HOME/cache/data)."""


@dataclass
class MethodConfig:
    name: str = "lora"
    """Fine-tuning method: lora, qlora, dora, prefix, prompt, ia3, bottleneck, full (peftkit.methods.catalog)."""
    rank: int = 16
    """Rank of the LoRA update matrices; higher learns more and costs more."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is scaled by alpha/rank (alpha/sqrt(rank) with use_rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training."""
    target_modules: list[str] | str = "attention"
    """Layers that get adapters: attention, all-linear, or an explicit list such as [q_proj, v_proj]."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): learns magnitude and direction separately; slower, often better at low rank."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha/sqrt(rank), which keeps high ranks learning."""
    num_virtual_tokens: int = 20
    """Prefix and prompt tuning: number of learned virtual tokens."""
    prefix_projection: bool = False
    """Prefix tuning: reparameterize the prefix through an MLP (more stable, more parameters while training)."""
    prompt_init_text: str | None = None
    """Prompt tuning: initialize the soft prompt from the embeddings of this text instead of at random."""
    reduction_factor: int = 16
    """Bottleneck adapters: hidden size divided by this gives the bottleneck width."""
    adapter_placement: str = "both"
    """Bottleneck adapters: after attention, mlp, or both (Houlsby); mlp alone is Pfeiffer-style."""
    init_from: str | None = None
    """Continue training from an existing adapter directory (recorded as the parent in the registry)."""


@dataclass
class TrainConfig:
    output_dir: str | None = None
    """Run directory for the adapter, checkpoints and metrics (default: runs/<name>)."""
    epochs: float = 1.0
    """Passes over the training data (ignored when train.max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 trains for train.epochs."""
    learning_rate: float | str = 2e-4
    """Peak learning rate (after warmup), or auto: a short range test on the training rows picks it before training (about 5% of the run's rows, bounded per method; curve in lr_search.png, result in metrics.json)."""
    batch_size: int = 8
    """Examples (or packed sequences) per device per step."""
    gradient_accumulation_steps: int = 1
    """Micro-batches summed into one optimizer step (effective batch = batch_size x this x devices)."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warmup: cosine, linear or constant."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming the learning rate up from zero."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 disables)."""
    optimizer: str = "adamw_torch"
    """Optimizer name as transformers knows it (adamw_torch, paged_adamw_8bit, adafactor, ...)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, about 30% slower."""
    compile: bool = False
    """torch.compile each decoder layer (compiled code cached under $PEFTKIT_HOME/compile-cache); the first steps pay the compile time, reported as compile_time_s in metrics.json (docs/benchmarks.md says when it pays)."""
    save_steps: int = 200
    """Write a checkpoint every this many steps."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints (the newest)."""
    eval_steps: int = 0
    """Evaluate every this many steps (0: at the end of each epoch only)."""
    early_stopping: int = 0
    """With an eval split: stop when eval loss has not improved for this many evaluations, and keep the best evaluation's weights as the adapter (0: off). A checkpoint is saved at every evaluation."""
    logging_steps: int = 5
    """Log the training loss every this many steps."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers that get the logged metrics: any of tensorboard (event files in <output_dir>/tensorboard), wandb, mlflow, trackio, or [none]. wandb logs offline unless WANDB_MODE or WANDB_API_KEY is set; mlflow and trackio write into the run folder unless MLFLOW_TRACKING_URI / TRACKIO_DIR say where."""
    seed: int = 42
    """Seed for weight init, data order and dropout."""


@dataclass
class EvalConfig:
    generate: bool = False
    """After training, also answer the eval split with the base and the adapter and score both (exact match, ROUGE-L, chrF, forgetting), as `peftkit eval` does; results go to metrics.json and the model card."""
    max_new_tokens: int = 128
    """Longest generated answer in that evaluation."""
    examples: int = 3
    """Example answers (reference, base, adapter) kept in the report."""


@dataclass
class RegistryConfig:
    register: bool = True
    """Add the trained adapter to the registry when training ends."""
    path: str | None = None
    """Registry folder (default: $PEFTKIT_HOME/registry, i.e. ~/.peftkit/registry)."""
    tags: list[str] = field(default_factory=list)
    """Tags given to the registered version (e.g. [stable])."""
    domain: str | None = None
    """Domain recorded with the adapter (e.g. retail, legal), for `registry list --domain`."""


@dataclass
class RunConfig:
    name: str | None = None
    """Name of this run: the registry name and the default output folder runs/<name> (default: the data file's, my_chats.jsonl -> my-chats)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "bf16", "fp16", "fp32"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "data.format": ("auto", "chat", "instruction", "completion", "text"),
    "data.length_policy": ("truncate", "drop"),
    "method.name": METHOD_NAMES,
    "method.adapter_placement": ("attention", "mlp", "both"),
    "train.lr_scheduler": ("cosine", "linear", "constant", "constant_with_warmup"),
}
TARGET_PRESETS = ("attention", "all-linear")
REPORT_TO = ("tensorboard", "wandb", "mlflow", "trackio", "none")


def peftkit_home() -> Path:
    """Return the folder for peftkit's caches and registry ($PEFTKIT_HOME, default ~/.peftkit)."""
    return Path(os.environ.get("PEFTKIT_HOME", Path.home() / ".peftkit")).expanduser()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Return the RunConfig from a YAML file (or defaults) with `key=value` overrides applied."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/smollm2-135m/lora.yaml (or configs/demo/fernhill.yaml for the demo)")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, method, train), got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value, e.g. --set method.rank=32")
        _set_dotted(raw, key.strip(), _parse_scalar(value))
    cfg = _build(RunConfig, raw, prefix="")
    if cfg.name is None:  # never a preset's: a run is named after what it learns from
        cfg.name = name_from_data(cfg.data.path or next((s.get("path") for s in cfg.data.sources if isinstance(s, dict)), None))
    _validate(cfg)
    if cfg.train.output_dir is None:
        cfg.train.output_dir = str(Path("runs") / cfg.name)
    return cfg


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".gz", ".zst", ".bz2", ".xz")


def name_from_data(path: str | None) -> str:
    """Return a registry-safe run name from a data file or folder: my_chats.jsonl -> my-chats; "adapter" without one."""
    if not path:
        return "adapter"
    stem = Path(str(path).rstrip("/\\")).name
    while Path(stem).suffix.lower() in DATA_SUFFIXES:
        stem = stem[: -len(Path(stem).suffix)]
    # Lower-case words joined by '-': what registry names look like (fernhill-support); '.' kept for v1.2.
    name = re.sub(r"[^a-z0-9.]+", "-", stem.lower()).strip("-.")[:128].rstrip("-.")
    return name or "adapter"


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Return the config as plain dicts and lists, ready for YAML or JSON."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically, so a crash never leaves half a file)."""
    atomic.write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """Return {field name: docstring} read from the string literal under each field."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    return docs


def all_keys() -> dict[str, str]:
    """Return every public dotted key with its help text."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(f.type) or isinstance(f.default_factory, type):  # a section
            section = typing.get_type_hints(RunConfig)[f.name]
            for k, doc in field_docs(section).items():
                out[f"{f.name}.{k}"] = doc
        else:
            out[f.name] = field_docs(RunConfig).get(f.name, "")
    return out


# ---------------------------------------------------------------- internals

def _parse_scalar(text: str) -> Any:
    # YAML parsing gives `32` -> int, `true` -> bool, `[q_proj, v_proj]` -> list, `null` -> None.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(close) + "?"
    return "valid keys: " + ", ".join(options)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            full = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"unknown key {prefix}{key}; {_suggest(prefix + str(key), full)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, hint)
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be a whole number, e.g. {key}=16")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number, e.g. {key}=3 or {key}=0.5")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[a, b]")
        (item,) = args or (Any,)
        return [v if item is Any else _coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping, e.g. {key}={{a: b}}")
        return dict(value)
    return value


def _validate(cfg: RunConfig) -> None:
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), choices, n=1)
            also = f" (did you mean {hint[0]}?)" if hint else ""
            raise ConfigError(f"{key}={value!r} is unknown{also}; choose one of {', '.join(choices)}")
    m, t, d = cfg.method, cfg.train, cfg.data
    positive = {"method.rank": m.rank, "method.num_virtual_tokens": m.num_virtual_tokens,
                "method.reduction_factor": m.reduction_factor, "train.batch_size": t.batch_size,
                "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
                "train.save_steps": t.save_steps, "train.logging_steps": t.logging_steps,
                "data.max_seq_length": d.max_seq_length}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be greater than 0")
    if m.alpha <= 0:
        raise ConfigError(f"method.alpha={m.alpha} must be greater than 0 (common choice: twice method.rank)")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"method.dropout={m.dropout} must be in [0, 1)")
    if isinstance(t.learning_rate, str) and t.learning_rate != "auto":
        raise ConfigError(f"train.learning_rate={t.learning_rate!r} must be a number (e.g. 2e-4) or auto")
    if not isinstance(t.learning_rate, str) and not 0 < t.learning_rate < 1:
        raise ConfigError(f"train.learning_rate={t.learning_rate} is out of range; typical LoRA values are 1e-4 to 3e-4, "
                          "or train.learning_rate=auto to measure one")
    if t.early_stopping < 0:
        raise ConfigError(f"train.early_stopping={t.early_stopping} must be 0 (off) or a number of evaluations, e.g. 3")
    if t.epochs <= 0 and t.max_steps <= 0:
        raise ConfigError("train.epochs and train.max_steps are both <= 0: set train.epochs=1 or train.max_steps=100")
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
    if not str(d.split).strip():
        raise ConfigError("data.split='' must name a split of the hub dataset, e.g. data.split=train or data.split=train[:1000]")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    for tracker in t.report_to:
        if tracker not in REPORT_TO:
            hint = difflib.get_close_matches(tracker, REPORT_TO, n=1)
            also = f" (did you mean {hint[0]}?)" if hint else ""
            raise ConfigError(f"train.report_to={t.report_to!r}: {tracker!r} is not a tracker{also}; choose from "
                              f"{', '.join(REPORT_TO)}, e.g. train.report_to=[tensorboard, wandb]")
    if "none" in t.report_to and len(t.report_to) > 1:
        raise ConfigError(f"train.report_to={t.report_to!r} mixes none with trackers; use train.report_to=[none] "
                          "to log to no tracker, or list only the trackers")
    if isinstance(m.target_modules, str) and m.target_modules not in TARGET_PRESETS:
        raise ConfigError(f"method.target_modules={m.target_modules!r} is not a preset; use attention, all-linear or a list such as [q_proj, v_proj]")
    from peftkit.registry.names import NAME_RE, RULE  # the registry's rule: a run registers under its name

    if not NAME_RE.match(cfg.name):
        raise ConfigError(f"name={cfg.name!r} may use only what a registry name may: {RULE}")
