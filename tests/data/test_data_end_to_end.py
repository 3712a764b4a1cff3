"""Every format and source type, mixed and packed, trains through `peftkit train` (train.train)."""
from __future__ import annotations

import csv
import json

from peftkit.config import load_config


def test_all_formats_and_sources_train_through_peftkit_train(tmp_path, tiny_model_dir):
    import datasets

    from peftkit.train import train

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Colour of item {i}?"},
                                                     {"role": "assistant", "content": f"Item {i} is red."}]}) + "\n"
                            for i in range(8)), encoding="utf-8")
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"Size {i}?"},
                                                       {"from": "gpt", "value": f"Size {i} is small."}]} for i in range(8)]))
    with open(tmp_path / "instructions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "input", "answer"])
        writer.writerows([f"Translate {i}", "to French", f"numéro {i}"] for i in range(8))
    datasets.Dataset.from_list([{"prompt": f"Count to {i}", "completion": " ".join(map(str, range(i + 1)))}
                                for i in range(8)]).to_parquet(str(tmp_path / "completions.parquet"))
    datasets.Dataset.from_list([{"text": f"Document {i} about tents."} for i in range(8)]).save_to_disk(str(tmp_path / "docs"))
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=fp32", "data.packing=true",
                             "data.max_seq_length=128", "data.eval_fraction=0.25", "train.max_steps=3",
                             "train.batch_size=2", "train.logging_steps=1", "train.learning_rate=0.005",
                             f"train.output_dir={tmp_path / 'run'}", "registry.register=false"])
    cfg.data.sources = [{"path": str(chat), "weight": 2}, {"path": str(sharegpt)},
                        {"path": str(tmp_path / "instructions.csv"), "columns": {"question": "instruction", "answer": "output"}},
                        {"path": str(tmp_path / "completions.parquet")}, {"path": str(tmp_path / "docs"), "weight": 0.5}]
    result = train(cfg)
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]
    assert [(s["format"], s["examples"]) for s in data["sources"]] == [
        ("chat", 12), ("chat", 6), ("instruction", 6), ("completion", 6), ("text", 3)]
    assert data["examples"] == 33 and data["eval"]["examples"] == 10 and data["packed_sequences"] < 33
    assert result.metrics["steps"] == 3 and result.metrics["eval_loss"] is not None
    assert result.metrics["data"]["fingerprint"].startswith("sha256:")
