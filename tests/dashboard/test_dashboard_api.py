"""The page's JSON routes against a live `peftkit serve`: runs as training wrote them, the registry, and changes."""
from __future__ import annotations

import json
import math
import shutil

import httpx
import pytest
from dashboard_helpers import HOSTILE, KEY, log_steps

from peftkit.dashboard.runs import read_run
from peftkit.registry import Registry

AUTH = {"Authorization": f"Bearer {KEY}"}
CHANGE = {**AUTH, "X-Peftkit-Page": "1"}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=30) as client:
        yield client


def test_the_page_is_public_and_its_data_needs_the_key(http):
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline script can run
    script = http.get("/dashboard/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    for path in ("/dashboard/api/info", "/dashboard/api/runs", "/dashboard/api/registry", "/v1/models"):
        assert http.get(path).status_code == 401, path
        assert http.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
    refused = http.get("/dashboard/api/runs").json()
    assert "Authorization: Bearer KEY" in refused["error"]["message"]
    info = http.get("/dashboard/api/info", headers=AUTH).json()
    assert info["playground"] is True


def test_runs_list_the_finished_the_live_and_the_hostile_run(http, runs_dir):
    runs = {r["id"]: r for r in http.get("/dashboard/api/runs", headers=AUTH).json()["runs"]}
    assert set(runs) == {"chat-bot", "live-run", f"odd/{HOSTILE}"}
    finished = runs["chat-bot"]
    metrics = json.loads((runs_dir / "chat-bot" / "metrics.json").read_text())
    assert (finished["status"], finished["step"], finished["max_steps"]) == ("finished", 6, 6)
    assert finished["train_loss"] == pytest.approx(metrics["train_loss"])
    assert runs[f"odd/{HOSTILE}"]["name"] == HOSTILE  # JSON carries it verbatim; the page shows it as text
    assert runs["live-run"]["status"] == "running" and not runs["live-run"]["stale"]


def test_a_finished_run_has_its_curves_config_metrics_data_and_evaluation(http, runs_dir):
    run = http.get("/dashboard/api/runs/chat-bot", headers=AUTH).json()
    folder = runs_dir / "chat-bot"
    history = json.loads((folder / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    logged = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert run["curves_source"] == "tensorboard"
    assert [p[0] for p in run["curves"]["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert all(v == pytest.approx(logged[s], rel=1e-6) for s, v in run["curves"]["train/loss"])
    assert run["curves"]["eval/loss"][-1][0] == 6
    assert run["config"]["method.name"] == "lora" and run["config"]["name"] == "chat-bot"
    assert "method:" in run["config_yaml"]
    state = json.loads((folder / "run.json").read_text())
    assert (run["base_fingerprint"], run["data_fingerprint"]) == (state["base_fingerprint"], state["data_fingerprint"])
    assert run["data"]["examples"] > 0 and run["data"]["sources"][0]["path"].endswith("chat.jsonl")
    assert set(run["evaluation"]["scores"]) == {"base", "adapter"} and run["evaluation"]["cases"] > 0
    assert run["metrics"]["steps"] == 6 and "data" not in run["metrics"] and run["has_adapter"]


def test_a_live_run_shows_each_step_as_it_is_logged(http, runs_dir):
    before = http.get("/dashboard/api/runs/live-run", headers=AUTH).json()
    first = before["step"]
    assert before["status"] == "running" and before["max_steps"] == 40 and first >= 3
    log_steps(runs_dir / "live-run", range(first + 1, first + 6))  # five more steps, one with an eval
    after = http.get("/dashboard/api/runs/live-run", headers=AUTH).json()
    assert after["step"] == first + 5
    assert [p[0] for p in after["curves"]["train/loss"]][-5:] == list(range(first + 1, first + 6))
    assert after["train_loss"] == pytest.approx(3.0 / (first + 5) ** 0.5)
    assert after["curves"]["eval/loss"], "an eval step was logged"
    assert after["metrics"] == {} and after["data"] is None  # written when the run ends


@pytest.mark.parametrize("run_id", ["%2E%2E/registry", "..%2F..%2Fetc", "chat-bot/adapter", "chat-bot/checkpoints", "%2Fetc", "nope"])
def test_only_runs_found_under_the_runs_folder_can_be_read(http, run_id):
    response = http.get(f"/dashboard/api/runs/{run_id}", headers=AUTH)
    assert response.status_code == 404
    assert "no run" in response.json()["error"]["message"] or response.json()["error"]["message"].startswith("Not found")


def test_without_event_files_the_newest_checkpoint_gives_the_curves(runs_dir, tmp_path):
    copy = tmp_path / "runs" / "no-tb"
    shutil.copytree(runs_dir / "chat-bot", copy, ignore=shutil.ignore_patterns("tensorboard"))
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["eval_loss"] = math.nan  # JSON has no NaN: the page must get null
    (copy / "metrics.json").write_text(json.dumps(metrics))
    run = read_run(tmp_path / "runs", "no-tb")
    assert run["curves_source"] == "checkpoint"
    assert [p[0] for p in run["curves"]["train/loss"]] == [1, 2, 3, 4, 5, 6]
    from peftkit.dashboard.runs import clean
    assert json.loads(json.dumps(clean(run), allow_nan=False))["metrics"]["eval_loss"] is None


def test_registry_lists_versions_with_lineage_scores_and_children(http, registry_dir, runs_dir):
    entries = {e["ref"]: e for e in http.get("/dashboard/api/registry", headers=AUTH).json()["entries"]}
    assert {"chat-bot@1", "chat-bot@2", "legal-bot@1", "ops-bot@1"} <= set(entries)
    one, two = entries["chat-bot@1"], entries["chat-bot@2"]
    state = json.loads((runs_dir / "chat-bot" / "run.json").read_text())
    assert (one["domain"], one["tags"], one["data_fingerprint"]) == ("support", ["stable"], state["data_fingerprint"])
    assert one["children"] == ["chat-bot@2"] and not one["latest"] and two["latest"]
    assert two["parent"] == "chat-bot@1" and two["tags"] == ["canary"]
    assert two["scores"]["evaluation"]["loss"] == [3.1, 1.4] and two["scores"]["forgetting"] == pytest.approx(0.025)
    assert one["size"] > 0 and one["base_fingerprint"].startswith("sha256:")
    detail = http.get("/dashboard/api/registry/chat-bot:canary", headers=AUTH).json()
    assert detail["ref"] == "chat-bot@2" and detail["parents"][0] == {
        "ref": "chat-bot@1", "registered": True, "method": "lora", "data_fingerprint": state["data_fingerprint"]}
    assert {f["path"] for f in detail["files"]} >= {"adapter_config.json", "adapter_model.safetensors"}
    missing = http.get("/dashboard/api/registry/chat-bot@9", headers=AUTH)
    assert missing.status_code == 404 and "chat-bot" in missing.json()["error"]["message"]


def test_tag_untag_and_remove_change_the_registry_and_need_the_key_and_the_page_header(http, registry_dir, tiny_model_dir, tmp_path):
    from serving_helpers import make_adapter

    assert http.post("/dashboard/api/registry/ops-bot@1/tag", params={"tag": "blue"}).status_code == 401
    refused = http.post("/dashboard/api/registry/ops-bot@1/tag", params={"tag": "blue"}, headers=AUTH)
    assert refused.status_code == 403 and "X-Peftkit-Page: 1" in refused.json()["error"]["message"]

    tagged = http.post("/dashboard/api/registry/ops-bot@1/tag", params={"tag": "blue"}, headers=CHANGE).json()
    assert tagged["ref"] == "ops-bot@1" and "blue" in tagged["tags"]
    with Registry(registry_dir) as reg:
        assert reg.show("ops-bot:blue").ref == "ops-bot@1"
    bad = http.post("/dashboard/api/registry/ops-bot@1/tag", params={"tag": "no spaces"}, headers=CHANGE)
    assert bad.status_code == 400 and "is not allowed" in bad.json()["error"]["message"]

    assert http.post("/dashboard/api/registry/ops-bot:blue/untag", headers=CHANGE).json()["tags"] == []
    with Registry(registry_dir) as reg:
        assert reg.show("ops-bot@1").tags == []
    again = http.post("/dashboard/api/registry/ops-bot:blue/untag", headers=CHANGE)
    assert again.status_code == 404 and "has no tag 'blue'" in again.json()["error"]["message"]

    with Registry(registry_dir) as reg:
        reg.add(make_adapter(tiny_model_dir, tmp_path / "gone", seed=9), name="gone-bot", base_model_dir=tiny_model_dir)
    assert http.post("/dashboard/api/registry/gone-bot@1/remove", headers=AUTH).status_code == 403
    assert http.post("/dashboard/api/registry/gone-bot@1/remove", headers=CHANGE).json() == {"removed": ["gone-bot@1"]}
    with Registry(registry_dir) as reg:
        assert "gone-bot" not in {e.name for e in reg.list()}
    assert http.post("/dashboard/api/registry/gone-bot@1/remove", headers=CHANGE).status_code == 404


def test_verify_says_ok_then_names_a_corrupt_file(tiny_model_dir, tmp_path):
    from fastapi.testclient import TestClient
    from serving_helpers import make_adapter

    from peftkit.dashboard import Dashboard
    from peftkit.dashboard.app import create_dashboard_app

    with Registry(tmp_path / "reg") as reg:
        entry = reg.add(make_adapter(tiny_model_dir, tmp_path / "a", seed=5), name="a-bot", base_model_dir=tiny_model_dir)
    app = create_dashboard_app(Dashboard(runs=tmp_path / "runs", registry=str(tmp_path / "reg"), api_key=None, playground=False))
    with TestClient(app) as client:
        page = {"X-Peftkit-Page": "1"}
        assert client.get("/dashboard/api/info").json()["playground"] is False  # no key set: no key needed
        assert client.post("/dashboard/api/verify", headers=page).json()["ok"] is True
        weights = next(f for f in entry.files if f.path == "adapter_model.safetensors")
        blob = next((tmp_path / "reg").rglob(weights.sha256))
        blob.chmod(0o644)
        blob.write_bytes(b"not the weights")
        report = client.post("/dashboard/api/registry/a-bot@1/verify", headers=page).json()
        assert report["ok"] is False
        assert [(p["ref"], p["path"]) for p in report["problems"]] == [("a-bot@1", "adapter_model.safetensors")]
        assert client.get("/v1/models").status_code == 404  # no model behind this page
        assert client.get("/dashboard/api/runs").json()["runs"] == []


def test_dashboard_command_refuses_to_listen_beyond_loopback_without_a_key(monkeypatch, capsys):
    from peftkit.cli import main

    monkeypatch.delenv("PEFTKIT_API_KEY", raising=False)
    assert main(["dashboard", "--host", "0.0.0.0"]) != 0
    assert "without an API key" in capsys.readouterr().err


def test_no_script_puts_strings_into_the_page_as_markup():
    from peftkit.dashboard.routes import STATIC

    sources = {p.name: p.read_text() for p in STATIC.glob("*.js")}
    assert {"app.js", "runs.js", "registry.js", "playground.js"} <= set(sources)
    for name, text in sources.items():
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in text, f"{name} uses {sink}"
    html = (STATIC / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing from another host: works offline
