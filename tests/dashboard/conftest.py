"""Dashboard fixtures: a real training run of the tiny Llama, a run still training, a registry with lineage, a server.

The finished run is trained by `peftkit.train` itself (6 steps, with the evaluation it writes), so
the page reads exactly what training leaves behind. The running run is what training writes while
it goes: run.json with status running, and TensorBoard events the test appends to as steps log.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))  # make_adapter: LoRA with random weights
from dashboard_helpers import HOSTILE, KEY, start_live_run, train_tiny  # noqa: E402
from serving_helpers import make_adapter  # noqa: E402


@pytest.fixture(scope="session")
def registry_path(tmp_path_factory) -> Path:
    """Return the (empty) folder of the dashboard tests' registry; training registers into it first."""
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory, tiny_model_dir, registry_path) -> Path:
    """Return a runs folder: a finished tiny run (registered as chat-bot@1), a copy under a hostile name, a live run."""
    root = tmp_path_factory.mktemp("runs")
    data = tmp_path_factory.mktemp("data")
    rows = [{"messages": [{"role": "user", "content": f"What colour is item {i}?"},
                          {"role": "assistant", "content": f"Item {i} is {('red', 'blue', 'green')[i % 3]}."}]} for i in range(48)]
    (data / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    finished = train_tiny(tiny_model_dir, data / "chat.jsonl", root / "chat-bot", registry_path)
    hostile = root / "odd" / HOSTILE
    shutil.copytree(finished, hostile)
    state = json.loads((hostile / "run.json").read_text())
    state["config"]["name"] = HOSTILE
    (hostile / "run.json").write_text(json.dumps(state))
    start_live_run(root / "live-run", finished)
    return root


@pytest.fixture(scope="session")
def registry_dir(runs_dir, registry_path, tiny_model_dir, tmp_path_factory) -> Path:
    """Return the registry training filled (chat-bot@1, domain support, tag stable), plus chat-bot@2 (parent @1,
    tag canary, with a stored evaluation), legal-bot@1 (domain legal) and ops-bot@1 (no domain)."""
    from peftkit.evaluate import EvalReport
    from peftkit.registry import Registry

    path = registry_path  # chat-bot@1 is in it: training registered it
    adapters = tmp_path_factory.mktemp("dash-adapters")
    with Registry(path) as reg:
        reg.add(make_adapter(tiny_model_dir, adapters / "v2", seed=1), name="chat-bot", tags=["canary"], domain="support",
                parent="chat-bot@1", base_model_dir=tiny_model_dir)
        report = EvalReport(adapter="chat-bot@2", base_model=str(tiny_model_dir), data="held-out chats", cases=12,
                            scores={"base": {"loss": 3.1, "token_accuracy": 0.21, "rouge_l": 0.18},
                                    "adapter": {"loss": 1.4, "token_accuracy": 0.55, "rouge_l": 0.61}},
                            forgetting={"base_loss": 4.0, "adapter_loss": 4.1, "relative_change": 0.025})
        reg.set_evaluation("chat-bot@2", report.to_dict())
        reg.add(make_adapter(tiny_model_dir, adapters / "legal", seed=2), name="legal-bot", domain="legal",
                base_model_dir=tiny_model_dir)
        reg.add(make_adapter(tiny_model_dir, adapters / "ops", seed=3), name="ops-bot", base_model_dir=tiny_model_dir)
    return path


@pytest.fixture(scope="module")
def engine(tiny_model_dir, registry_dir):
    """Return a started Engine on the tiny model and the dashboard's registry (fp32)."""
    from peftkit.serving.engine import Engine
    from peftkit.serving.settings import ServeSettings

    eng = Engine(ServeSettings(str(tiny_model_dir), registry=str(registry_dir), dtype="fp32")).start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def server(engine, runs_dir, registry_dir):
    """Return the base URL of a live `peftkit serve` app (key required) over the engine, the runs and the registry."""
    from peftkit.serving.app import create_app
    from peftkit.serving.server import start_background
    from peftkit.serving.settings import ServeSettings

    settings = ServeSettings(registry=str(registry_dir), runs=str(runs_dir), api_key=KEY)
    running = start_background(create_app(engine, settings))
    yield running.url
    running.stop()
