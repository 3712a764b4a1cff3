"""Serving fixtures: LoRA adapters with random non-zero weights on the tiny Llama, a registry holding them, an engine.

Adapters get random A and B matrices (peft initializes B to zero, which would make every adapter
equal to the base), so outputs really differ per adapter and a mixed batch that mixed them up
would show.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from serving_helpers import LORA_NAMES, make_adapter, make_method_adapter

# Adapters of every other method, each served beside the LoRA family: (name, method, extra method fields).
OTHER_METHODS = [("prefix0", "prefix", {}), ("prefix-mlp", "prefix", {"prefix_projection": True}),
                 ("prompt0", "prompt", {}), ("bottleneck0", "bottleneck", {}), ("full0", "full", {})]


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Return {name: adapter folder}: nine LoRA adapters, DoRA, IA3, prefix (with and without MLP), prompt,
    bottleneck and full fine-tune adapters, and a LoHa adapter (a peft type the server does not run)."""
    root = tmp_path_factory.mktemp("adapters")
    dirs = {name: make_adapter(tiny_model_dir, root / name, seed=i) for i, name in enumerate(LORA_NAMES)}
    dirs["dora0"] = make_adapter(tiny_model_dir, root / "dora0", seed=100, use_dora=True)
    dirs["ia3"] = make_adapter(tiny_model_dir, root / "ia3", seed=200, kind="ia3")
    dirs["loha"] = make_adapter(tiny_model_dir, root / "loha", seed=300, kind="loha")
    for i, (name, method, fields) in enumerate(OTHER_METHODS):
        dirs[name] = make_method_adapter(tiny_model_dir, root / name, method, seed=400 + i, **fields)
    return dirs


@pytest.fixture(scope="session")
def registry_dir(adapter_dirs, tiny_model_dir, tmp_path_factory) -> Path:
    """Return a registry folder holding every adapter of adapter_dirs but LoHa (which the registry refuses), lora0 twice
    (version 2 tagged stable)."""
    from peftkit.registry import Registry

    path = tmp_path_factory.mktemp("registry")
    registry = Registry(path)
    for name, folder in adapter_dirs.items():
        if name == "loha":  # a peft type peftkit does not run: only registries of older versions hold one
            continue
        registry.add(folder, name=name, base_model_dir=tiny_model_dir)
    registry.add(adapter_dirs["lora1"], name="lora0", tags=["stable"], base_model_dir=tiny_model_dir)
    registry.close()
    return path


@pytest.fixture(scope="module")
def engine(tiny_model_dir, registry_dir):
    """Return a started Engine on the tiny model and the test registry (fp32, for exact comparisons)."""
    from peftkit.serving.engine import Engine
    from peftkit.serving.settings import ServeSettings

    eng = Engine(ServeSettings(str(tiny_model_dir), registry=str(registry_dir), dtype="fp32", max_loaded_adapters=8)).start()
    yield eng
    eng.stop()


@pytest.fixture
def server_for():
    """Return make(engine, **settings) -> a TestClient over an app serving the engine (closed after the test)."""
    from fastapi.testclient import TestClient

    from peftkit.serving.app import create_app
    from peftkit.serving.settings import ServeSettings

    clients = []

    def make(engine, **settings):
        clients.append(TestClient(create_app(engine, ServeSettings(**settings))).__enter__())
        return clients[-1]
    yield make
    for client in clients:
        client.__exit__(None, None, None)
