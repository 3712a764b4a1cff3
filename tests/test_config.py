"""Config: YAML + overrides into typed fields, and errors that name the key and the fix."""
from pathlib import Path

import pytest

from peftkit.cli import main
from peftkit.config import ConfigError, all_keys, load_config

REPO = Path(__file__).resolve().parents[1]
PUBLIC_KEYS = ["model.name", "model.dtype", "data.path", "data.format", "method.name", "method.rank", "method.alpha",
               "train.epochs", "train.max_steps", "train.learning_rate", "train.batch_size", "train.save_steps",
               "train.output_dir", "train.seed"]


def test_public_keys_exist_and_are_documented():
    keys = all_keys()
    for key in PUBLIC_KEYS:
        assert key in keys, key
        assert len(keys[key]) > 20, f"{key} needs a docstring"
    assert all(doc for doc in keys.values()), [k for k, d in keys.items() if not d]


def test_defaults_follow_common_practice():
    cfg = load_config()
    assert (cfg.method.name, cfg.method.rank, cfg.method.alpha, cfg.method.dropout) == ("lora", 16, 32.0, 0.05)
    assert cfg.train.learning_rate == 2e-4 and cfg.train.lr_scheduler == "cosine" and cfg.train.warmup_ratio > 0
    assert cfg.train.output_dir == "runs/adapter"


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  rank: 8\ntrain:\n  learning_rate: 1e-4\n")
    cfg = load_config(path, ["method.rank=32", "method.target_modules=[q_proj, v_proj]", "train.epochs=2",
                             "data.packing=true", "train.output_dir=out/x"])
    assert cfg.method.rank == 32 and isinstance(cfg.method.rank, int)
    assert cfg.train.learning_rate == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.epochs == 2.0 and cfg.data.packing is True and cfg.train.output_dir == "out/x"


@pytest.mark.parametrize("override, words", [
    ("method.rnk=8", ["unknown key method.rnk", "method.rank"]),
    ("trian.epochs=1", ["unknown key trian", "train"]),
    ("method.name=lorra", ["method.name='lorra' is unknown", "did you mean lora", "qlora"]),
    ("method.rank=abc", ["method.rank='abc' must be a whole number"]),
    ("method.rank=0", ["method.rank=0 must be greater than 0"]),
    ("data.format=chats", ["data.format='chats' is unknown", "chat, instruction"]),
    ("train.learning_rate=5", ["train.learning_rate=5.0 is out of range"]),
    ("model.dtype=float8", ["model.dtype='float8' is unknown", "bf16"]),
    ("data.packing=maybe", ["data.packing='maybe' must be true or false"]),
    ("method.target_modules=everything", ["not a preset", "all-linear"]),
    ("name=../etc", ["may use only what a registry name may", "letters, digits"]),
    ("name=_private", ["may use only what a registry name may", "starting with a letter or digit"]),
    ("justakey", ["must look like key=value"]),
])
def test_bad_values_name_key_and_fix(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, override.split(" "))
    for word in words:
        assert word in str(info.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_every_shipped_yaml_loads_and_validates():
    files = sorted(f for f in (REPO / "configs").glob("*/*.yaml") if f.parent.name != "accelerate")  # launch configs
    names = {f"{f.parent.name}/{f.name}" for f in files}
    assert {"smollm2-135m/lora.yaml", "llama-3.1-8b/lora.yaml", "llama-3.1-8b/qlora.yaml"} <= names
    for f in files:
        cfg = load_config(f)
        assert cfg.model.name and cfg.method.name
        if f.parent.name == "llama-3.1-8b":
            assert cfg.data.max_seq_length == 2048 and cfg.train.gradient_checkpointing and cfg.model.dtype == "bf16"
            assert cfg.method.target_modules == "all-linear"


def test_cli_reports_config_errors_in_one_line(capsys):
    assert main(["config", "--set", "method.rnk=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key method.rnk") and "Traceback" not in err
