"""The Hugging Face Hub: models and datasets by id (gated, offline, not found) and `peftkit push`.

Nothing here reaches the network: the hub client is replaced by a recorder, datasets.load_dataset by an
in-memory stand-in, and sockets fail loudly where a test says no request may be made.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx2
import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from safetensors.numpy import save_file

from peftkit.cli import main
from peftkit.data.errors import DataError
from peftkit.hub import HubError, push_adapter
from peftkit.models import ModelError, resolve_model
from peftkit.registry import Registry, UnknownRefError

LLAMA_ID = "meta-llama/Llama-3.1-8B-Instruct"
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
DATA_FP = "sha256:" + "d" * 64


def http_error(cls, status: int, url: str = "https://huggingface.co/api/repos/create"):
    """Return a real huggingface_hub error carrying a fake HTTP response with this status."""
    return cls(f"{status} Client Error", response=httpx2.Response(status, request=httpx2.Request("POST", url)))


@pytest.fixture
def online(monkeypatch):
    """Undo the test session's HF_HUB_OFFLINE=1 (conftest), so code takes its online path."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    import datasets.config  # it read HF_HUB_OFFLINE once, when first imported (by whichever test came first)

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to open a connection fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args[:2]}")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def registry(tmp_path) -> Registry:
    """Return a registry holding support-bot@1: a tiny LoRA with the lineage training writes."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(2):
        for module, n_out in (("q_proj", 64), ("v_proj", 32)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((8, 64)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((n_out, 8)).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}))
    (folder / "peftkit.json").write_text(json.dumps(
        {"method": "lora", "base_model": "smollm2-135m-instruct", "base_fingerprint": "sha256:" + "ab" * 32,
         "base_config": LLAMA, "data_fingerprint": DATA_FP, "metrics": {"eval_loss": 1.25, "train_loss": 1.5},
         "config": {"method": {"name": "lora", "rank": 8}}, "created_at": "2025-01-02T03:04:05+00:00"}))
    reg = Registry(tmp_path / "registry")
    reg.add(folder, name="support-bot")
    yield reg
    reg.close()


class FakeApi:
    """Records what push asks of the hub; `fail` maps a method name to the exception it raises."""

    def __init__(self, fail: dict | None = None, public: bool = False):
        self.calls, self.fail, self.public, self.uploaded = [], fail or {}, public, {}

    def _call(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))
        if name in self.fail:
            raise self.fail[name]

    def create_repo(self, repo_id, **kwargs):
        self._call("create_repo", repo_id, **kwargs)

    def model_info(self, repo_id, **kwargs):
        self._call("model_info", repo_id, **kwargs)
        return type("Info", (), {"private": not self.public})()

    def create_branch(self, repo_id, **kwargs):
        self._call("create_branch", repo_id, **kwargs)

    def upload_folder(self, **kwargs):
        self._call("upload_folder", **kwargs)
        folder = Path(kwargs["folder_path"])  # gone once push returns: keep what it held
        self.uploaded = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def registry_snapshot(reg: Registry) -> dict[str, int]:
    return {str(p.relative_to(reg.path)): p.stat().st_size for p in reg.path.rglob("*") if p.is_file() and "catalog.db" not in p.name}


# ---------------------------------------------------------------- push

def test_push_uploads_adapter_and_card_privately_from_a_staged_copy(registry, online, monkeypatch):
    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    before = registry_snapshot(registry)
    assert main(["push", "support-bot", "--repo", "my-org/support-bot", "--registry", str(registry.path)]) == 0
    create = next(kw for name, _, kw in api.calls if name == "create_repo")
    assert api.calls[0][1] == ("my-org/support-bot",) and create["private"] is True and create["exist_ok"] is True
    upload = next(kw for name, _, kw in api.calls if name == "upload_folder")
    assert upload["repo_id"] == "my-org/support-bot" and "support-bot@1" in upload["commit_message"]
    assert set(api.uploaded) == {"adapter_model.safetensors", "adapter_config.json", "peftkit.json", "README.md"}
    stored = registry.store.blob_path(next(f.sha256 for f in registry.show("support-bot").files if f.path == "adapter_model.safetensors"))
    assert api.uploaded["adapter_model.safetensors"] == stored.read_bytes()
    card = api.uploaded["README.md"].decode()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "library_name: peft" in card
    assert "eval_loss | 1.2500" in card and DATA_FP in card and "support-bot@1" in card
    assert registry_snapshot(registry) == before  # no checkout, no new blob: the registry was only read


def test_push_public_branch_and_refusal_of_an_existing_public_repo(registry, online):
    api = FakeApi()
    push_adapter(registry, "support-bot@1", "me/bot", private=False, token="hf_x", revision="v1", api=api)
    assert [n for n, _, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][2]["private"] is False and api.calls[2][2]["revision"] == "v1"
    with pytest.raises(HubError, match="already exists and is public; pass --public"):
        push_adapter(registry, "support-bot", "me/bot", token="hf_x", api=FakeApi(public=True))


@pytest.mark.parametrize("error, words", [
    (http_error(HfHubHTTPError, 401), ["refused the token (401", "hf auth login", "HF_TOKEN"]),
    (http_error(RepositoryNotFoundError, 401), ["refused the token (401", "hf auth login"]),
    (http_error(HfHubHTTPError, 403), ["no write access to acme", "(403)", "write role"]),
    (httpx2.ConnectError("[Errno 101] Network is unreachable"), ["could not reach the Hugging Face Hub", "network unreachable"]),
])
def test_push_failures_say_what_to_do(registry, online, error, words):
    with pytest.raises(HubError) as info:
        push_adapter(registry, "support-bot", "acme/bot", token="hf_x", api=FakeApi(fail={"create_repo": error}))
    assert all(w in str(info.value) for w in words), str(info.value)


def test_push_refuses_before_any_request(registry, online, monkeypatch):
    api = FakeApi()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubError, match=r"no Hugging Face token .*hf auth login.*--token"):
        push_adapter(registry, "support-bot", "acme/bot", api=api)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\): pushing support-bot@1 needs the network"):
        push_adapter(registry, "support-bot", "acme/bot", token="hf_x", api=api)
    with pytest.raises(UnknownRefError, match="support-bt"):
        push_adapter(registry, "support-bt", "acme/bot", token="hf_x", api=api)
    with pytest.raises(HubError, match="must look like ORG/NAME"):
        push_adapter(registry, "support-bot", "just-a-name", token="hf_x", api=api)
    assert api.calls == []


# ---------------------------------------------------------------- models by hub id

def test_offline_model_not_cached_names_the_folder_and_makes_no_request(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda *a, **k: pytest.fail("repo_info called offline"))
    with pytest.raises(ModelError) as info:
        resolve_model(LLAMA_ID)
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE=1" in message
    assert str(tmp_path / "hf" / "hub" / "models--meta-llama--Llama-3.1-8B-Instruct") in message
    assert f"hf download {LLAMA_ID}" in message


def test_model_offline_setting_uses_the_cache_only(tmp_path, online, monkeypatch, no_network):
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelError, match=r"model.offline=true"):
        resolve_model(LLAMA_ID, offline=True)
    snapshot = cache / "models--meta-llama--Llama-3.1-8B-Instruct" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    assert resolve_model(LLAMA_ID, offline=True) == snapshot


def test_training_with_model_offline_never_asks_the_hub(tmp_path, online, monkeypatch, no_network):
    from peftkit.config import load_config
    from peftkit.train import train

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
                    + "\n")
    cfg = load_config(None, [f"model.name={LLAMA_ID}", "model.offline=true", f"data.path={data}",
                             f"train.output_dir={tmp_path / 'run'}", "registry.register=false"])
    with pytest.raises(ModelError, match=r"model.offline=true"):
        train(cfg)


@pytest.mark.parametrize("error, words", [
    (http_error(GatedRepoError, 403, f"https://huggingface.co/api/models/{LLAMA_ID}"),
     ["is a gated model", "not been granted access", f"https://huggingface.co/{LLAMA_ID}", "HF_TOKEN", "hf auth login"]),
    (http_error(GatedRepoError, 401), ["is a gated model (no token was sent)", "accept its licence"]),
    (http_error(RepositoryNotFoundError, 401), ["no such model on the Hugging Face Hub, or it is private", "hf auth login"]),
    (http_error(RevisionNotFoundError, 404), ["model.revision='v9' does not exist"]),
    (LocalEntryNotFoundError("no connection"), ["model.name=DIR"]),
])
def test_hub_model_errors_say_what_to_do(online, monkeypatch, error, words):
    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        raise LocalEntryNotFoundError("not cached") if local_files_only else error
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ModelError) as info:
        resolve_model(LLAMA_ID, revision="v9")
    assert all(w in str(info.value) for w in words), str(info.value)


# ---------------------------------------------------------------- data by hub id

@pytest.fixture
def fake_load_dataset(monkeypatch):
    """Replace datasets.load_dataset with an in-memory stand-in; return its list of calls."""
    import datasets

    calls = []

    def load_dataset(path, name=None, *, split=None, revision=None, **kwargs):
        calls.append({"path": path, "name": name, "split": split, "revision": revision,
                      "offline": (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)})
        if load_dataset.error is not None:
            raise load_dataset.error
        return datasets.Dataset.from_list([{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(6)])
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    load_dataset.calls, load_dataset.error = calls, None
    return load_dataset


def test_hub_dataset_prepares_with_split_revision_and_column_mapping(tokenizer, online, fake_load_dataset):
    from peftkit.config import DataConfig
    from peftkit.data import prepare

    cfg = DataConfig(path="acme/math-qa", split="train[:6]", revision="0123abc", subset="main", eval_fraction=0.0,
                     columns={"question": "instruction", "answer": "output"}, max_seq_length=64)
    prepared = prepare(cfg, tokenizer, progress=False)
    assert fake_load_dataset.calls == [{"path": "acme/math-qa", "name": "main", "split": "train[:6]", "revision": "0123abc",
                                        "offline": (False, False)}]  # read once, though it is also fingerprinted
    assert prepared.stats["rows"] == 6 and prepared.stats["sources"][0]["format"] == "instruction"
    assert "What is 3 + 3?" in tokenizer.decode(prepared.train[3]["input_ids"])
    assert prepare(cfg, tokenizer, progress=False).stats["cached"] is True


def test_hub_dataset_offline_without_cache(online, fake_load_dataset):
    import datasets

    from peftkit.data.readers import read_rows

    fake_load_dataset.error = ConnectionError("Couldn't reach the Hugging Face Hub for dataset 'acme/qa': Offline mode is enabled.")
    with pytest.raises(DataError) as info:
        read_rows("acme/qa", offline=True)
    assert fake_load_dataset.calls[0]["offline"] == (True, True)  # both libraries refused requests during the load
    assert (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == (False, False)  # and were restored after
    assert "data.path='acme/qa' is not in the local Hugging Face cache" in str(info.value)
    assert "data.offline=true" in str(info.value) and str(datasets.config.HF_DATASETS_CACHE) in str(info.value)


@pytest.mark.parametrize("message, words", [
    ("Dataset 'acme/qa' is a gated dataset on the Hub. You must be authenticated to access it.",
     ["gated dataset (no token was sent)", "https://huggingface.co/datasets/acme/qa", "hf auth login"]),
    ("Dataset 'acme/qa' doesn't exist on the Hub or cannot be accessed.", ["no such dataset on the Hugging Face Hub", "check the spelling"]),
])
def test_hub_dataset_errors_say_what_to_do(online, fake_load_dataset, message, words):
    from datasets.exceptions import DatasetNotFoundError

    from peftkit.data.readers import read_rows

    fake_load_dataset.error = DatasetNotFoundError(message)
    with pytest.raises(DataError) as info:
        read_rows("acme/qa")
    assert all(w in str(info.value) for w in words), str(info.value)


def test_a_missing_data_file_is_not_taken_for_a_hub_id(fake_load_dataset):
    from peftkit.data.readers import read_rows

    with pytest.raises(DataError, match="no such file or folder"):
        read_rows("data/train.jsonl")
    assert fake_load_dataset.calls == []
