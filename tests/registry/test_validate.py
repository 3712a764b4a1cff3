"""Validation on add: safetensors only, shapes against the base config, rank limit; nothing half-added on refusal."""
from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from registry_fakes import IO, LLAMA, lora_tensors, write_adapter
from peftkit.registry import AdapterValidationError, PickleRefusedError
from peftkit.registry.validate import read_header


class _Bomb:
    """Unpickling this would create a marker file: proof that nothing was unpickled if it is absent."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _assert_nothing_added(reg):
    assert reg.list() == []
    assert list(reg.store.iter_blobs()) == []
    assert not reg.store.tmp.exists() or list(reg.store.tmp.iterdir()) == []


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl", ".ckpt"])
def test_pickle_weights_are_refused_and_never_loaded(reg, make_adapter, tmp_path, suffix):
    folder = make_adapter()
    marker = tmp_path / "unpickled"
    (folder / f"adapter_model{suffix}").write_bytes(pickle.dumps(_Bomb(str(marker))))
    with pytest.raises(PickleRefusedError) as err:
        reg.add(folder, "x")
    assert f"adapter_model{suffix}" in str(err.value)
    assert "never loads pickle" in str(err.value) and "safetensors" in str(err.value)
    assert not marker.exists()
    _assert_nothing_added(reg)


def test_a_pickle_disguised_as_safetensors_is_refused_unloaded(reg, make_adapter, tmp_path):
    folder = make_adapter()
    marker = tmp_path / "unpickled"
    (folder / "adapter_model.safetensors").write_bytes(pickle.dumps(_Bomb(str(marker))))
    with pytest.raises(PickleRefusedError, match="torch/pickle file under a .safetensors name"):
        reg.add(folder, "x")
    assert not marker.exists()
    _assert_nothing_added(reg)


def test_wrong_out_features_names_tensor_expected_and_found(reg, make_adapter):
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] = np.zeros((64, 8), np.float32)
    with pytest.raises(AdapterValidationError) as err:
        reg.add(make_adapter(tensors=tensors), "x")
    msg = str(err.value)
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in msg
    assert "shape [64, 8], expected [32, 8]" in msg
    _assert_nothing_added(reg)


def test_wrong_in_features_and_missing_layer_are_reported(reg, make_adapter):
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = np.zeros((8, 65), np.float32)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = np.zeros((8, 64), np.float32)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = np.zeros((64, 8), np.float32)
    with pytest.raises(AdapterValidationError) as err:
        reg.add(make_adapter(tensors=tensors), "x")
    assert "shape [8, 65], expected [8, 64]" in str(err.value)
    assert "layer 7 does not exist; the base model has 2 layers" in str(err.value)


def test_rank_must_agree_between_a_and_b(reg, make_adapter):
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = np.zeros((64, 4), np.float32)
    with pytest.raises(AdapterValidationError, match="lora_A has rank 8 but lora_B has rank 4"):
        reg.add(make_adapter(tensors=tensors), "x")


def test_rank_limit_is_enforced_and_configurable(reg, make_adapter):
    folder = make_adapter(tensors=lora_tensors(rank=300), rank=300)
    with pytest.raises(AdapterValidationError, match="rank 300 is above the limit of 256; pass --max-rank 300"):
        reg.add(folder, "x")
    assert reg.add(folder, "x", max_rank=512).rank == 300


def test_non_llama_modules_are_refused(reg, make_adapter):
    tensors = {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": np.zeros((8, 64), np.float32)}
    with pytest.raises(AdapterValidationError, match="is not a Llama adapter tensor"):
        reg.add(make_adapter(tensors=tensors), "x")


def test_truncated_safetensors_is_refused(reg, make_adapter):
    folder = make_adapter()
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AdapterValidationError, match="outside the .* data bytes; the file is truncated"):
        reg.add(folder, "x")


def test_a_header_longer_than_the_file_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(AdapterValidationError, match="does not fit"):
        read_header(path, "bad.safetensors")


def test_header_gives_names_dtypes_and_shapes(tmp_path):
    save_file({"a": np.zeros((3, 4), np.float16), "b": np.zeros(5, np.int64)}, str(tmp_path / "t.safetensors"))
    header = read_header(tmp_path / "t.safetensors", "t")
    assert {k: (v.dtype, v.shape) for k, v in header.items()} == {"a": ("F16", (3, 4)), "b": ("I64", (5,))}


def test_a_folder_without_adapter_files_is_refused(reg, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("hi")
    with pytest.raises(AdapterValidationError, match="not an adapter: expected adapter_config.json"):
        reg.add(tmp_path / "empty", "x")


@pytest.mark.parametrize("layout", ["dora", "all-linear", "embeddings"])
def test_lora_variants_pass(reg, make_adapter, layout):
    # Each config says what its tensors are: the targets and the rank are checked against them.
    if layout == "dora":
        folder = make_adapter(tensors=lora_tensors(dora=True), adapter_config={"use_dora": True}, lineage={"method": "dora"})
    elif layout == "all-linear":
        folder = make_adapter(tensors=lora_tensors(modules=tuple(IO)), adapter_config={"target_modules": "all-linear"})
    else:
        tensors = {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 49152), np.float32),
                   "base_model.model.model.embed_tokens.lora_embedding_B": np.zeros((64, 4), np.float32),
                   "base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32),
                   "base_model.model.lm_head.lora_B.weight": np.zeros((49152, 4), np.float32),
                   "base_model.model.lm_head.base_layer.weight": np.zeros((49152, 64), np.float16)}
        folder = make_adapter(tensors=tensors, rank=4, adapter_config={"target_modules": ["embed_tokens", "lm_head"]})
    assert reg.add(folder, "x").peft_type == "LORA"


def test_dora_magnitude_must_match_out_features(reg, make_adapter):
    tensors = lora_tensors(dora=True)
    tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"] = np.ones(64, np.float32)
    with pytest.raises(AdapterValidationError, match=r"shape \[64\], expected \[32\]"):
        reg.add(make_adapter(tensors=tensors), "x")


def test_ia3_prompt_and_prefix_shapes(reg, make_adapter):
    ia3 = {"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": np.ones((32, 1), np.float32),
           "base_model.model.model.layers.0.mlp.down_proj.ia3_l": np.ones((1, 128), np.float32)}
    ia3_config = {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"], "layers_to_transform": [0]}
    assert reg.add(make_adapter(tensors=ia3, peft_type="IA3", lineage={"method": "ia3"}, adapter_config=ia3_config),
                   "ia3").peft_type == "IA3"
    prompt = {"prompt_embeddings": np.zeros((5, 64), np.float32)}
    cfg = {"num_virtual_tokens": 5, "num_transformer_submodules": 1}
    as_prompt, as_prefix = {"lineage": {"method": "prompt"}}, {"lineage": {"method": "prefix"}}
    assert reg.add(make_adapter(tensors=prompt, peft_type="PROMPT_TUNING", adapter_config=cfg, **as_prompt),
                   "prompt").peft_type == "PROMPT_TUNING"
    prefix = {"prompt_embeddings": np.zeros((5, 2 * 2 * 32), np.float32)}  # 2 layers x (key, value) x kv width 32
    assert reg.add(make_adapter(tensors=prefix, peft_type="PREFIX_TUNING", adapter_config=cfg, **as_prefix),
                   "prefix").peft_type == "PREFIX_TUNING"
    wide = {"prompt_embeddings": np.zeros((5, 96), np.float32)}
    with pytest.raises(AdapterValidationError, match=r"prompt_embeddings has shape \[5, 96\], expected \[5, 64\]"):
        reg.add(make_adapter(tensors=wide, peft_type="PROMPT_TUNING", adapter_config=cfg, **as_prompt), "bad")
    ia3["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"] = np.ones((64, 1), np.float32)
    with pytest.raises(AdapterValidationError, match=r"k_proj.ia3_l has shape \[64, 1\], expected \[32, 1\]"):
        reg.add(make_adapter(tensors=ia3, peft_type="IA3", adapter_config=ia3_config), "bad")


def test_method_comes_from_the_adapter_config_when_no_lineage(reg, make_adapter):
    prompt = {"prompt_embeddings": np.zeros((5, 64), np.float32)}
    assert reg.add(make_adapter(tensors=prompt, peft_type="PROMPT_TUNING", lineage=False), "p").method == "prompt"
    dora = make_adapter(tensors=lora_tensors(dora=True), lineage=False, adapter_config={"use_dora": True})
    assert reg.add(dora, "d").method == "dora"


def test_full_fine_tune_is_checked_against_its_config(reg, tmp_path):
    folder = tmp_path / "full"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA))
    weights = {"model.layers.0.self_attn.q_proj.weight": np.zeros((64, 64), np.float16),
               "model.layers.0.mlp.down_proj.weight": np.zeros((64, 128), np.float16),
               "model.norm.weight": np.zeros(64, np.float16)}
    save_file(weights, str(folder / "model.safetensors"))
    assert reg.add(folder, "full").method == "full"
    weights["model.layers.0.mlp.down_proj.weight"] = np.zeros((128, 64), np.float16)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(AdapterValidationError, match=r"down_proj.weight has shape \[128, 64\], expected \[64, 128\]"):
        reg.add(folder, "full")


def test_without_lineage_base_config_option_enables_shape_checks(reg, make_adapter, tmp_path):
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = np.zeros((70, 8), np.float32)
    folder = make_adapter(tensors=tensors, lineage=False)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    with pytest.raises(AdapterValidationError, match=r"expected \[64, 8\]"):
        reg.add(folder, "x", base_config=tmp_path / "config.json")
    entry = reg.add(folder, "x")  # no base known: stored, shapes checked only against each other
    assert entry.base_fingerprint is None and entry.base_model == "tiny-llama"


def test_a_symlink_inside_the_folder_is_stored_as_its_content(reg, make_adapter):
    folder = make_adapter()
    (folder / "card.md").write_text("# card")
    os.symlink(folder / "card.md", folder / "README.md")
    entry = reg.add(folder, "x")
    assert (reg.checkout(entry.ref) / "README.md").read_text() == "# card"


def test_bottleneck_adapters_are_checked_for_layers_and_hidden_width(reg, make_adapter):
    good = {"layers.0.mlp.down.weight": np.zeros((4, 64), np.float32), "layers.0.mlp.down.bias": np.zeros(4, np.float32),
            "layers.1.attention.up.weight": np.zeros((64, 4), np.float32), "layers.1.attention.up.bias": np.zeros(64, np.float32)}
    kind = {"peft_type": "PEFTKIT_BOTTLENECK", "lineage": {"method": "bottleneck"}}
    assert reg.add(make_adapter(tensors=good, **kind), "bn").peft_type == "PEFTKIT_BOTTLENECK"
    bad = {**good, "layers.2.mlp.down.weight": np.zeros((4, 64), np.float32), "layers.0.mlp.up.weight": np.zeros((70, 4), np.float32)}
    with pytest.raises(AdapterValidationError) as err:
        reg.add(make_adapter(tensors=bad, **kind), "bn")
    assert "layer 2 does not exist" in str(err.value) and "layers.0.mlp.up.weight has shape [70, 4]; one side must be hidden_size=64" in str(err.value)
