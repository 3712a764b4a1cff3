"""Adapter files the server cannot use fail that adapter alone, with a clear error, and heal on the next lookup.

Registries written by older peftkit versions hold entries today's `registry add` refuses (a LoHa adapter,
a config that disagrees with its tensors, an adapter for another base with no base recorded); `legacy`
makes the registry hand out such files for one name.
"""
from __future__ import annotations

import json

import pytest
from serving_helpers import chat, make_adapter, make_method_adapter, make_other_base, remove_checkout, writable_copy

from peftkit.registry import Registry
from peftkit.serving.engine import Engine
from peftkit.serving.errors import UnsupportedAdapterError
from peftkit.serving.settings import ServeSettings


@pytest.fixture
def legacy(monkeypatch, tmp_path):
    """Return hand_out(name, edit): the registry holds, for name, the files edit(folder) made of the ones added."""
    import dataclasses
    import hashlib

    from peftkit.registry import FileRecord

    real_checkout, real_show, edits, busy = Registry.checkout, Registry.show, {}, set()

    def checkout(self, ref):
        folder, name = real_checkout(self, ref), self.show(ref).name
        if name not in edits:
            return folder
        copy = tmp_path / f"legacy-{name}"
        if not copy.exists():
            edits[name](writable_copy(folder, copy))
        return copy

    def show(self, ref):  # the catalog records the edited files, as it did when an older version added them
        entry = real_show(self, ref)
        if entry.name not in edits or entry.name in busy:
            return entry
        busy.add(entry.name)
        try:
            folder = checkout(self, entry.ref)
        finally:
            busy.discard(entry.name)
        files = [FileRecord(f.path, hashlib.sha256((folder / f.path).read_bytes()).hexdigest(), f.size) for f in entry.files]
        return dataclasses.replace(entry, files=files)

    monkeypatch.setattr(Registry, "checkout", checkout)
    monkeypatch.setattr(Registry, "show", show)
    return edits.__setitem__


def edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return edit


def test_removing_one_of_two_names_for_the_same_files_keeps_the_other_served(tiny_model_dir, tmp_path):
    registry = Registry(tmp_path / "registry")
    twin, other = (make_adapter(tiny_model_dir, tmp_path / name, seed=70 + i) for i, name in enumerate(("twin", "other")))
    for name, folder in (("twin-a", twin), ("twin-b", twin), ("other", other)):
        registry.add(folder, name=name, base_model_dir=tiny_model_dir)
    eng = Engine(ServeSettings(str(tiny_model_dir), registry=str(tmp_path / "registry"), dtype="fp32",
                               max_loaded_adapters=1)).start()
    try:
        expected = eng.generate(chat("twin-a"), 60).token_ids
        eng.generate(chat("other"), 60)  # one slot: the twins' files are evicted
        registry.remove("twin-a")  # deletes the checkout the server kept for those files
        assert eng.generate(chat("twin-b"), 60).token_ids == expected
        remove_checkout(registry.checkout("twin-b"))  # gone while its profile is kept: it is checked out again
        eng.generate(chat("other"), 60)
        assert eng.generate(chat("twin-b"), 60).token_ids == expected
    finally:
        eng.stop()


def test_a_missing_or_changed_file_fails_that_adapter_clearly_until_the_checkout_is_rebuilt(engine, tmp_path, server_for):
    registry = Registry(engine.settings.registry)
    registry.add(make_adapter(engine.settings.base, tmp_path / "fragile", seed=90), name="fragile",
                 base_model_dir=engine.settings.base)
    folder = registry.checkout("fragile")
    weights = folder / "adapter_model.safetensors"
    folder.chmod(0o755)
    weights.unlink()
    http = server_for(engine)
    body = {"model": "fragile", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "adapter_unavailable"
    assert "lacks adapter_model.safetensors" in reply.json()["error"]["message"] and "registry verify" in reply.text
    assert http.post("/v1/chat/completions", json={**body, "model": "lora1"}).status_code == 200
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")  # there again, but not what was registered
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 503 and "differ from what was registered" in reply.json()["error"]["message"]
    remove_checkout(folder)  # the registry rebuilds a checkout that is gone: the next lookup heals
    assert http.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("seed, name, edit", [
    (600, "old-rank", edit_config(r=8)),
    (601, "old-targets", edit_config(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    (602, "old-type", edit_config(peft_type="IA3", feedforward_modules=[])),
])
def test_an_adapter_whose_config_disagrees_with_its_tensors_gets_400(engine, legacy, tmp_path, seed, name, edit, server_for):
    legacy(name, edit)
    Registry(engine.settings.registry).add(make_adapter(engine.settings.base, tmp_path / name, seed=seed),
                                           name=name, base_model_dir=engine.settings.base)
    http = server_for(engine)
    body = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for _ in range(2):  # the first finds out while loading; the second is refused before it is queued
        reply = http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "model_not_supported"
        assert f"adapter {name}@1 cannot be served" in reply.json()["error"]["message"]
    assert http.post("/v1/chat/completions", json={**body, "model": "lora1"}).status_code == 200
    assert engine.ready


def test_a_legacy_entry_of_a_peft_type_the_server_does_not_run_is_refused(engine, adapter_dirs, legacy, tmp_path):
    import shutil

    def to_loha(folder):
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(adapter_dirs["loha"] / file, folder / file)

    legacy("old-loha", to_loha)
    Registry(engine.settings.registry).add(make_adapter(engine.settings.base, tmp_path / "l", seed=650), name="old-loha",
                                           base_model_dir=engine.settings.base)
    with pytest.raises(UnsupportedAdapterError, match="peft_type 'LOHA' is not one this server runs"):
        engine.submit(chat("old-loha"))


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_an_adapter_for_another_base_without_a_recorded_base_gets_400(engine, tmp_path, method, server_for):
    other = make_other_base(engine.settings.base, tmp_path / "other-base")
    folder = (make_adapter(other, tmp_path / "misfit", seed=700) if method == "lora" else
              make_method_adapter(other, tmp_path / "misfit", "prefix", seed=701))
    Registry(engine.settings.registry).add(folder, name=f"misfit-{method}")  # no base given: none recorded
    reply = server_for(engine).post("/v1/chat/completions", json={"model": f"misfit-{method}", "max_tokens": 2,
                                                                 "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "model_not_supported"
    assert engine.generate(chat("lora1", max_tokens=2), 60).completion_tokens == 2

