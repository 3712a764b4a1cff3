"""`peftkit eval`: does the adapter beat its base on held-out data, and what did it cost on everything else?

Both models see exactly what training saw: conversations rendered with the adapter's recorded
template and system prompt (peftkit.prompting), loss and accuracy on the tokens training learns
(every assistant turn, its end-of-turn token included), greedy answers that stop on the recorded
stop tokens. The base is the same loaded model with the adapter switched off (a full fine-tune's
base is loaded beside it). The forgetting check measures both on general English text that ships
with Python itself (pydoc_data: the language reference's topics), which no adapter was trained on.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import PeftkitError
from peftkit.generate import Session, generate

IGNORE = -100
SIDES = ("base", "adapter")


@dataclass
class Case:
    """One held-out example: its tokens and trained labels, and for conversations the prompt and the reference answer."""

    where: str
    ids: list[int]
    labels: list[int]
    prompt: list[dict[str, str]] | None = None
    """The conversation up to the last assistant turn (None for raw text, which is scored by loss only)."""
    reference: str | None = None
    """The last assistant turn's text."""


@dataclass
class EvalSettings:
    """How much to evaluate and how: the knobs of `peftkit eval` and of `eval.*` in training."""

    max_new_tokens: int = 128
    batch_size: int = 8
    limit: int | None = None
    examples: int = 3
    forgetting: bool = True
    generate: bool = True
    progress: bool = True


@dataclass
class EvalReport:
    """The evaluation of one adapter (or base) on one data set, as written to JSON."""

    adapter: str | None
    base_model: str
    data: str
    cases: int
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """side (base, adapter) -> metric -> value."""
    forgetting: dict[str, Any] | None = None
    examples: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON-ready data, with the adapter-minus-base difference per metric."""
        out = {k: getattr(self, k) for k in ("adapter", "base_model", "data", "cases", "scores", "forgetting",
                                              "examples", "seconds")}
        if set(SIDES) <= set(self.scores):
            base, tuned = self.scores["base"], self.scores["adapter"]
            out["difference"] = {k: None if base.get(k) is None or tuned.get(k) is None else tuned[k] - base[k]
                                 for k in tuned}
        return out


def build_cases(tokenizer: Any, examples: list, prompting, *, max_seq_length: int | None = None) -> list[Case]:
    """Return the examples as Cases, tokenized and labelled exactly as training labels them."""
    from peftkit.data.masks import encode_examples
    from peftkit.data.templates import resolve_template

    template = resolve_template(tokenizer, prompting.chat_template) if any(e.messages for e in examples) else None
    encoded = encode_examples(tokenizer, examples, template, system_prompt=prompting.system_prompt, progress=False)
    cases = []
    for example, enc in zip(examples, encoded):
        ids, labels = enc.input_ids, enc.labels
        if max_seq_length:
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        prompt = reference = None
        if example.messages:
            last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
            prompt, reference = example.messages[:last], example.messages[last]["content"]
        cases.append(Case(example.where, ids, labels, prompt or None, reference if prompt else None))
    return cases


def teacher_forced(model, cases: list[Case], *, pad_id: int, batch_size: int, desc: str, progress: bool) -> dict:
    """Return loss, perplexity and token accuracy on the cases' trained tokens (next-token prediction)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    total = correct = 0
    loss_sum = 0.0
    order = sorted(range(len(cases)), key=lambda i: len(cases[i].ids))  # similar lengths pad little
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        width = max(len(cases[i].ids) for i in batch)
        ids = torch.tensor([cases[i].ids + [pad_id] * (width - len(cases[i].ids)) for i in batch], device=device)
        labels = torch.tensor([cases[i].labels + [IGNORE] * (width - len(cases[i].labels)) for i in batch], device=device)
        mask = torch.tensor([[1] * len(cases[i].ids) + [0] * (width - len(cases[i].ids)) for i in batch], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -width:]  # prompt tuning adds virtual positions
        logits, targets = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t+1
        keep = targets != IGNORE
        picked, wanted = logits[keep], targets[keep]
        loss_sum += float(torch.nn.functional.cross_entropy(picked, wanted, reduction="sum"))
        correct += int((picked.argmax(-1) == wanted).sum())
        total += int(keep.sum())
    loss = loss_sum / total if total else None
    return {"loss": loss, "perplexity": math.exp(loss) if loss is not None and loss < 50 else None,
            "token_accuracy": correct / total if total else None, "tokens": total}


def answers(session: Session, cases: list[Case], *, use_adapter: bool, settings: EvalSettings, desc: str) -> list[str]:
    """Return the greedy answer to every conversation case, generated in batches of similar prompt length."""
    from tqdm.auto import tqdm

    order = sorted(range(len(cases)), key=lambda i: sum(len(m["content"]) for m in cases[i].prompt))
    out: dict[int, str] = {}
    batches = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not settings.progress, leave=False):
        replies = generate(session, [cases[i].prompt for i in batch], max_new_tokens=settings.max_new_tokens,
                           use_adapter=use_adapter)
        out.update(zip(batch, replies))
    return [out[i] for i in range(len(cases))]


def generation_scores(predictions: list[str], references: list[str]) -> dict[str, float | None]:
    """Return exact match, ROUGE-L F1 (rouge-score) and chrF (sacrebleu) of answers against references, in 0..1."""
    if not predictions:
        return {"exact_match": None, "rouge_l": None, "chrf": None}
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    chrf = CHRF().corpus_score(predictions, [references]).score / 100
    exact = [" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references)]
    return {"exact_match": sum(exact) / len(exact), "rouge_l": sum(rouge) / len(rouge), "chrf": chrf}


def forgetting_cases(tokenizer: Any, *, texts: int = 24, max_tokens: int = 256) -> list[Case]:
    """Return general English passages from Python's own documentation (pydoc_data), every token scored."""
    from pydoc_data.topics import topics

    chosen = [topics[k] for k in sorted(topics) if len(topics[k]) > 1500][:texts]
    cases = []
    for i, text in enumerate(chosen):
        ids = tokenizer(" ".join(text.split()), add_special_tokens=False)["input_ids"][:max_tokens]
        cases.append(Case(f"pydoc_data.topics[{i}]", ids, list(ids)))
    return cases


@contextlib.contextmanager
def adapter_off(model, on: bool):
    """Run the block with the adapter switched off (when on is False and the model has one to switch)."""
    if on or not hasattr(model, "disable_adapter"):
        yield
    else:
        with model.disable_adapter():
            yield


def base_session(session: Session) -> tuple[Session, bool]:
    """Return (the session that runs the base, whether it does so by switching the adapter off)."""
    from peftkit.methods.full import is_full_model

    if session.adapter is None or not is_full_model(session.model):
        return session, True
    from peftkit.models import load_base  # a full fine-tune replaced every weight: the base is another model

    dtype = str(next(session.model.parameters()).dtype).removeprefix("torch.")
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, "auto")
    return replace(session, model=load_base(session.base_model, dtype=dtype).eval()), False


def evaluate_session(session: Session, cases: list[Case], *, data: str, settings: EvalSettings,
                     base_only: bool = False) -> EvalReport:
    """Return the base-vs-adapter report for a loaded session on these cases."""
    started = time.perf_counter()
    if settings.limit:
        cases = cases[:settings.limit]
    if not cases:
        raise PeftkitError(f"{data}: no examples to evaluate")
    report = EvalReport(session.adapter, session.base_model, data, len(cases))
    base, switch = base_session(session)
    sides = [("base", base, not switch)] + ([] if base_only or session.adapter is None else [("adapter", session, True)])
    chats = [c for c in cases if c.prompt]
    said: dict[str, list[str]] = {}
    for side, run, use_adapter in sides:
        with adapter_off(run.model, use_adapter):
            report.scores[side] = teacher_forced(run.model, cases, pad_id=run.tokenizer.pad_token_id,
                                                 batch_size=settings.batch_size, desc=f"{side} loss",
                                                 progress=settings.progress)
        if settings.generate and chats:
            said[side] = answers(run, chats, use_adapter=use_adapter, settings=settings, desc=f"{side} answers")
            report.scores[side].update(generation_scores(said[side], [c.reference for c in chats]))
    if settings.forgetting:
        report.forgetting = forgetting(sides, settings)
    report.examples = [{"prompt": c.prompt[-1]["content"], "reference": c.reference,
                        **{side: said[side][i] for side in said}} for i, c in enumerate(chats[:settings.examples])]
    report.seconds = time.perf_counter() - started
    return report


def forgetting(sides: list, settings: EvalSettings) -> dict[str, Any]:
    """Return each side's loss on general text and the adapter's relative change against the base."""
    texts = forgetting_cases(sides[0][1].tokenizer)
    out: dict[str, Any] = {"source": "Python documentation (pydoc_data.topics)", "texts": len(texts)}
    for side, run, use_adapter in sides:
        with adapter_off(run.model, use_adapter):
            out[f"{side}_loss"] = teacher_forced(run.model, texts, pad_id=run.tokenizer.pad_token_id,
                                                 batch_size=settings.batch_size, desc=f"{side} general text",
                                                 progress=settings.progress)["loss"]
    if "adapter_loss" in out:
        out["relative_change"] = (out["adapter_loss"] - out["base_loss"]) / out["base_loss"]
    return out


def eval_examples(adapter_dir: Path | None, data: str | None, meta: dict, seed_default: int = 42) -> tuple[list, str]:
    """Return (examples, where they came from): --data, else the run's eval file, else its held-out split."""
    from peftkit.config import DataConfig
    from peftkit.data.prepare import held_out_examples, read_examples

    recorded = (meta.get("config") or {}).get("data") or {}
    if data:
        return read_examples(data, recorded.get("format", "auto"), dict(recorded.get("columns") or {}))[0], data
    if recorded.get("eval_path"):
        path = recorded["eval_path"]
        return read_examples(path, recorded.get("format", "auto"), dict(recorded.get("columns") or {}))[0], path
    fields = {k: v for k, v in recorded.items() if k in DataConfig.__dataclass_fields__}
    cfg = DataConfig(**fields)
    if (cfg.path or cfg.sources) and cfg.eval_fraction > 0:
        seed = ((meta.get("config") or {}).get("train") or {}).get("seed", seed_default)
        held = held_out_examples(cfg, seed)
        if held:
            return held, f"{cfg.path or 'data.sources'} (the run's held-out {cfg.eval_fraction:g})"
    raise PeftkitError(f"{adapter_dir or 'the base model'}: no held-out data is recorded for it; "
                       "pass --data FILE (any format training accepts)")


def run_eval(ref_or_dir: str | None, *, data: str | None = None, base: str | None = None, base_only: bool = False,
             settings: EvalSettings | None = None, registry: str | None = None, dtype: str = "auto",
             out: str | Path | None = None) -> tuple[EvalReport, Path]:
    """Return the report for an adapter (registry reference or folder) and the JSON file it was written to.

    A registered adapter also gets the report in its registry entry.
    """
    from peftkit import atomic
    from peftkit.generate import load_session, resolve_adapter
    from peftkit.methods import read_adapter_meta
    from peftkit.prompting import read_prompting

    settings = settings or EvalSettings()
    adapter_dir = resolve_adapter(ref_or_dir, registry) if ref_or_dir else None
    meta = read_adapter_meta(adapter_dir) if adapter_dir else {}
    examples, source = eval_examples(adapter_dir, data, meta)
    session = load_session(ref_or_dir, base=base, dtype=dtype, registry=registry)
    max_len = ((meta.get("config") or {}).get("data") or {}).get("max_seq_length")
    cases = build_cases(session.tokenizer, examples, read_prompting(adapter_dir), max_seq_length=max_len)
    report = evaluate_session(session, cases, data=source, settings=settings, base_only=base_only)
    report.adapter = ref_or_dir
    target = Path(out) if out else Path(f"eval-{_slug(ref_or_dir or report.base_model)}.json")
    atomic.write_json(target, report.to_dict())
    if ref_or_dir and not Path(ref_or_dir).expanduser().exists():  # a registry reference, not a folder
        from peftkit.registry import Registry

        Registry(registry).set_evaluation(ref_or_dir, report.to_dict())
    return report, target


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-@" else "-" for c in Path(text).name or text)[:80]
