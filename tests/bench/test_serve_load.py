"""`python -m peftkit.bench.serve_load`: every scenario of issue #15 in one run on the tiny model, beside the naive loop.

Speed is never asserted here (the benchmark's output is read for that); these tests check that every scenario
answers every request, that the figures are consistent with one another, and that the naive baseline is timed
as the clients of a generate-behind-a-lock endpoint would see it.
"""
from __future__ import annotations

import json

import pytest

from peftkit.bench import serve_load
from peftkit.bench.naive_generate import run_naive

SCENARIOS = ["naive", "single", "mixed 8", "mixed 10", "every method", "one batch per adapter", "no prefix cache 8",
             "batch-invariant 8"]


def test_one_run_measures_every_scenario_beside_the_naive_loop(tiny_model_dir, tmp_path, capsys):
    out_json, out_md = tmp_path / "load.json", tmp_path / "load.md"
    rc = serve_load.main(["--base", str(tiny_model_dir), "--adapters", "10", "--rank", "4", "--requests", "10",
                          "--concurrency", "4", "--max-tokens", "4", "--dtype", "fp32", "--methods",
                          "--compare-prefix-cache", "--batch-invariant", "--system-words", "30",
                          "--json", str(out_json), "--markdown", str(out_md)])
    assert rc == 0
    saved = json.loads(out_json.read_text())
    results = saved["results"]
    assert list(results) == SCENARIOS
    for label, r in results.items():
        assert (r["ok"], r["errors"], r["unsent"]) == (10, {}, 0), label
        assert r["completion_tokens"] == 10 * 4, label  # the naive loop counts tokens as the server does
        assert 0 < r["ttft_p50_s"] <= r["p50_s"] and r["ttft_p99_s"] <= r["p99_s"], label
        assert 0 < r["tpot_p50_s"] <= r["tpot_p99_s"] <= r["p99_s"], label
    assert [results[s]["models"] for s in SCENARIOS] == [8, 1, 8, 10, 8, 8, 8, 8]
    assert results["naive"]["batch_rows_mean"] == 1
    # Four requests in flight: the server answers them in shared forwards, LoRA, prefix and prompt rows alike.
    assert results["mixed 8"]["batch_rows_mean"] > 1 and results["every method"]["batch_rows_mean"] > 1
    assert results["batch-invariant 8"]["batch_rows_mean"] == 1  # every row runs its own forwards
    assert results["mixed 8"]["prefix_cache_hits"] > 0  # the template's header and system turn repeat
    assert results["no prefix cache 8"]["prefix_cache_hits"] == results["batch-invariant 8"]["prefix_cache_hits"] == 0
    assert set(saved["ratios"]) == {"mixed 8 / single tok/s", "mixed 10 / single tok/s", "peftkit single / naive tok/s",
                                    "peftkit mixed 8 / naive tok/s", "naive / peftkit single TTFT p50",
                                    "naive / peftkit mixed 8 TTFT p50", "no prefix cache / mixed 8 TTFT p50",
                                    "mixed 8 / no prefix cache tok/s", "batch-invariant 8 / mixed 8 tok/s"}
    assert all(v > 0 for v in saved["ratios"].values())
    printed = capsys.readouterr().out
    assert "TTFT p50 ms" in printed and "TPOT p99 ms" in printed and "peftkit mixed 8 / naive tok/s:" in printed
    assert "TTFT p50: naive " in printed and "machine:" in printed
    table = out_md.read_text().splitlines()
    assert table[0].startswith("| scenario | adapters | ok | errors | req/s | tok/s | TTFT p50 ms |")
    assert [row.split(" | ")[0] for row in table[2:2 + len(SCENARIOS)]] == [f"| {s}" for s in SCENARIOS]


def test_every_adapter_is_sent_every_prompt_in_turn():
    from peftkit.bench.naive_generate import request

    models, prompts = ["a", "b"], ["p", "q", "r"]
    sent = [(m, messages[-1]["content"]) for m, messages in (request(i, models, prompts) for i in range(12))]
    assert [m for m, _ in sent] == ["a", "b"] * 6
    assert {p for m, p in sent if m == "a"} == {p for m, p in sent if m == "b"} == set(prompts)
    assert request(3, models, prompts, "Be brief.")[1][0] == {"role": "system", "content": "Be brief."}


def test_naive_loop_answers_one_request_at_a_time_as_clients_send_them(tiny_model_dir, tmp_path):
    args = serve_load.parse_args(["--base", str(tiny_model_dir), "--adapters", "8", "--rank", "4"])
    registry, names = serve_load.build_setup(args, tmp_path)
    timings, wall, unsent = run_naive(str(tiny_model_dir), registry, names[:2], serve_load.PROMPTS, requests=5,
                                      concurrency=2, max_tokens=3, max_seconds=300, dtype="fp32")
    assert unsent == 0 and [t.tokens for t in timings] == [3] * 5
    # Two clients send at t=0; each sends its next request when its previous answer comes back.
    assert timings[0].sent == timings[1].sent
    assert [t.sent for t in timings[2:]] == [t.done for t in timings[:3]]
    # One generate at a time: each starts after the one before it ended, so the wait counts in its TTFT.
    for before, after in zip(timings, timings[1:]):
        assert before.done <= after.first
    assert timings[-1].done - timings[0].sent == pytest.approx(wall, abs=0.05)


def test_load_script_refuses_targets_beyond_loopback():
    serve_load.check_loopback("http://127.0.0.1:8000")
    with pytest.raises(SystemExit, match="only loopback"):
        serve_load.check_loopback("http://10.1.2.3:8000")
    with pytest.raises(SystemExit, match="--adapters 4: the mixed scenarios need at least 8"):
        serve_load.main(["--adapters", "4"])
