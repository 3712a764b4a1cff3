"""The method catalog is the one place method facts live: every table elsewhere agrees with it."""
from __future__ import annotations

import json

import pytest
import torch

from peftkit.methods import CATALOG, METHOD_NAMES, builder, build_method, loader_for, read_adapter_meta
from peftkit.methods.catalog import MIXED_KINDS, MODEL, method_names, method_of, serve_kind_of
from method_helpers import load_tiny, method_config


def test_every_record_names_a_builder_and_loader_that_exist():
    for m in CATALOG.values():
        assert callable(builder(m.name)), m.name
        assert m.serve_kind in (*MIXED_KINDS, "dora", MODEL), m.name
        for peft_type in m.peft_types:
            if m.loader:
                assert callable(loader_for(peft_type)), (m.name, peft_type)
    assert loader_for("LORA") is None  # stock peft reads LoRA back


def test_config_choices_and_help_come_from_the_catalog():
    from peftkit.config import CHOICES, MethodConfig, field_docs

    assert CHOICES["method.name"] == METHOD_NAMES
    help_text = field_docs(MethodConfig)["name"]
    assert all(name in help_text for name in METHOD_NAMES), help_text


def test_compare_tables_come_from_the_catalog():
    from peftkit import compare

    assert set(compare.DEFAULT_METHODS) == set(METHOD_NAMES) - {"dora"}
    assert compare.METHOD_LR == {m.name: m.learning_rate for m in CATALOG.values() if m.learning_rate is not None}
    assert "lora" not in compare.METHOD_LR  # the LoRA family keeps the config's rate


def test_method_of_reads_every_peft_type_back_to_its_method():
    for m in CATALOG.values():
        for peft_type in m.peft_types:
            config = {"peft_type": peft_type, "use_dora": m.name == "dora"}
            assert method_of(config) in {n for n in METHOD_NAMES if peft_type in CATALOG[n].peft_types}
            assert serve_kind_of(config) == CATALOG[method_of(config)].serve_kind
    assert method_of(None) == "full" and serve_kind_of(None) == MODEL
    assert method_of({"peft_type": "LOHA"}) == "loha" and serve_kind_of({"peft_type": "LOHA"}) is None
    assert method_names(vllm=True) == ("lora", "qlora")


def test_a_foreign_prefix_adapter_is_called_prefix(tmp_path):
    """Before the catalog, read_adapter_meta said 'prefix_tuning' where the registry said 'prefix'."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "base_model_name_or_path": "b"}))
    assert read_adapter_meta(tmp_path) == {"base_model": "b", "method": "prefix", "config": {}}


def _loss_and_grads(model, trainer_cls, tmp_path, batch, *, sparse: bool):
    from transformers import TrainingArguments

    trainer = trainer_cls(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"),
                          sparse_logits=sparse)
    model.zero_grad()
    labels = batch["labels"]
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=int((labels[:, 1:] != -100).sum()))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", method_names(keeps_base_forward=True))
def test_methods_that_keep_the_base_forward_train_the_same_with_the_sparse_loss(tiny_model_dir, tmp_path, name):
    """Projecting only trained positions to the vocabulary gives the stock loss and gradients for these methods."""
    from peftkit.trainer import SafeTrainer

    torch.manual_seed(0)
    model = build_method(load_tiny(tiny_model_dir, name), method_config(name))
    with torch.no_grad():  # move the adapter off its no-op start, so its gradients are not trivially alike
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    ids = torch.randint(5, 1000, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[2, 9:] = -100
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    stock = _loss_and_grads(model, SafeTrainer, tmp_path, batch, sparse=False)
    sparse = _loss_and_grads(model, SafeTrainer, tmp_path, batch, sparse=True)
    assert torch.allclose(stock[0], sparse[0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(stock[1], sparse[1]))


def test_the_trainer_gets_the_sparse_loss_from_the_catalog(tiny_overrides):
    from peftkit.checkpoints import GracefulStop
    from peftkit.config import load_config
    from peftkit.data import prepare
    from peftkit.models import load_tokenizer
    from peftkit.train import build_model, build_trainer

    for name in ("lora", "prompt"):
        cfg = load_config("configs/demo/fernhill.yaml", tiny_overrides + [f"method.name={name}", "method.rank=4",
                                                                               "method.num_virtual_tokens=4"])
        tokenizer = load_tokenizer(cfg.model.name)
        trainer = build_trainer(cfg, build_model(cfg), tokenizer, prepare(cfg.data, tokenizer), cfg.train.output_dir,
                                GracefulStop())
        assert trainer.sparse_logits is CATALOG[name].keeps_base_forward
