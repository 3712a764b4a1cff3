"""One request never stops generation for the others, and /health and /ready tell the truth about the engine."""
from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from serving_helpers import chat

from peftkit.serving.app import create_app
from peftkit.serving.engine import Engine, GenerationRequest
from peftkit.serving.errors import EngineUnavailableError, GenerationFailedError, InvalidRequestError
from peftkit.serving.settings import ServeSettings

USER = [{"role": "user", "content": "What colour is item 3?"}]


def test_a_tiny_temperature_samples_greedily_and_the_engine_keeps_serving(engine):
    greedy = engine.generate(chat("lora1", max_tokens=6), timeout=60).token_ids
    # 1e-40 passes validation (0 <= t <= 2); dividing logits by it used to give NaN and kill the generation thread.
    assert engine.generate(chat("lora1", max_tokens=6, temperature=1e-40), timeout=60).token_ids == greedy
    assert engine.generate(chat("lora2", max_tokens=2, temperature=0.7, seed=3), timeout=60).completion_tokens == 2
    assert engine.ready


def test_a_top_p_below_float32s_smallest_number_samples_the_most_likely_token(engine):
    # Found by the HTTP fuzz: top_p=5e-324 became 0 in float32, every token fell outside the nucleus, and sampling failed.
    greedy = engine.generate(chat("lora1", max_tokens=6), timeout=60).token_ids
    for top_p in (5e-324, 1e-45, 1e-30):
        assert engine.generate(chat("lora1", max_tokens=6, temperature=1.0, top_p=top_p, seed=1), timeout=60).token_ids == greedy


def test_nan_logits_fail_only_their_own_request(engine, monkeypatch):
    from peftkit.serving import batcher

    other = chat("lora3", max_tokens=8)
    expected = engine.generate(other, timeout=60).token_ids
    real_step = batcher.Lane.step

    def step_with_a_nan_row(self, tokens):
        logits = real_step(self, tokens)
        for i, row in enumerate(self.rows):
            if row.temperature == 0.8:  # the victim's row: a model that overflows on this request only
                logits[i, 5] = float("nan")
        return logits

    monkeypatch.setattr(batcher.Lane, "step", step_with_a_nan_row)
    victim, bystander = engine.submit_batch([chat("lora2", max_tokens=8, temperature=0.8, seed=1), other])
    with pytest.raises(GenerationFailedError, match="NaN or inf"):
        victim.result(60)
    assert bystander.result(60).token_ids == expected
    assert engine.ready


def test_an_unexpected_error_in_a_step_fails_only_its_request(engine, monkeypatch):
    from peftkit.serving import stream

    other = chat("lora4", max_tokens=8)
    expected = engine.generate(other, timeout=60).token_ids
    real_push = stream.TextStream.push

    def push_failing_for_one_request(self, token):
        if "BOOM" in self.stops:
            raise KeyError("a bug in one request's bookkeeping (simulated)")
        return real_push(self, token)

    monkeypatch.setattr(stream.TextStream, "push", push_failing_for_one_request)
    victim, bystander = engine.submit_batch([chat("lora4", max_tokens=8, stop=["BOOM"]), other])
    with pytest.raises(GenerationFailedError, match="KeyError"):
        victim.result(60)
    assert bystander.result(60).token_ids == expected
    assert engine.ready


def test_a_dead_generation_thread_is_reported_by_health_ready_and_every_request(tiny_model_dir, registry_dir):
    eng = Engine(ServeSettings(str(tiny_model_dir), registry=str(registry_dir), dtype="fp32")).start()

    def crash():
        raise SystemExit("the worker was killed (simulated)")  # what no handler inside the loop may catch

    eng._scheduler.admit = crash
    try:
        with pytest.raises(EngineUnavailableError, match="generation thread died"):
            eng.submit(chat("lora1")).result(30)  # fails at once rather than hanging
        with TestClient(create_app(eng)) as http:
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "failed"
            ready = http.get("/ready")
            assert ready.status_code == 503 and "generation thread died" in ready.json()["error"]["message"]
            reply = http.post("/v1/chat/completions", json={"model": "lora1", "messages": USER})
            assert reply.status_code == 503 and "still loading" not in reply.json()["error"]["message"]
            assert "generation thread died" in reply.json()["error"]["message"]
    finally:
        eng.stop()


def test_an_engine_stuck_in_a_step_is_reported_then_recovers(tiny_model_dir, registry_dir, monkeypatch):
    from peftkit.serving import batcher

    eng = Engine(ServeSettings(str(tiny_model_dir), registry=str(registry_dir), dtype="fp32", stall_timeout_s=0.3)).start()
    release, real_step = threading.Event(), batcher.Lane.step
    monkeypatch.setattr(batcher.Lane, "step", lambda self, tokens: release.wait(30) and real_step(self, tokens))
    try:
        with TestClient(create_app(eng)) as http:
            assert http.get("/health").json() == {"status": "ok"}
            handle = eng.submit(chat("lora1", max_tokens=3))
            deadline = time.monotonic() + 20
            while http.get("/health").status_code == 200:
                assert time.monotonic() < deadline, "/health never reported the stuck engine"
                time.sleep(0.05)
            assert http.get("/health").json()["status"] == "stuck"
            assert "no progress" in http.get("/ready").json()["error"]["message"]
            release.set()
            assert handle.result(30).completion_tokens == 3
            assert http.get("/health").status_code == 200 and http.get("/ready").status_code == 200
    finally:
        release.set()
        eng.stop()


def test_seeds_beyond_64_bits_are_refused_not_crashed(engine, server_for):
    http = server_for(engine)
    for seed in (2**64, -(2**63) - 1, 2**70):
        reply = http.post("/v1/chat/completions", json={"model": "lora1", "messages": USER, "max_tokens": 2, "seed": seed})
        assert reply.status_code == 422 and reply.json()["error"]["param"] == "seed"
    for seed in (2**64 - 1, -(2**63)):
        reply = http.post("/v1/chat/completions", json={"model": "lora1", "messages": USER, "max_tokens": 2, "seed": seed,
                                                        "temperature": 0.5})
        assert reply.status_code == 200
    with pytest.raises(InvalidRequestError, match="64-bit"):
        engine.submit(chat("lora1", temperature=0.5, seed=2**70))


# A template that does arithmetic on message content, as some do: it divides by zero on a 7-character message, and the
# Jinja sandbox refuses its loop (OverflowError) on a long one.
MATH_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "{{ '' if (1 / (m['content']|length - 7)) else '' }}"
                 "{% for i in range(m['content']|length * 1000) %}{% endfor %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_templates_that_raise_on_the_content_give_400(engine, adapter_dirs, tmp_path, server_for):
    import json
    import shutil

    from peftkit.registry import Registry

    folder = tmp_path / "mathy"
    shutil.copytree(adapter_dirs["lora6"], folder)
    (folder / "peftkit.json").write_text(json.dumps({"method": "lora", "config": {"data": {"chat_template": MATH_TEMPLATE}}}))
    Registry(engine.settings.registry).add(folder, name="mathy", base_model_dir=engine.settings.base)
    assert engine.generate(GenerationRequest(model="mathy", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                             temperature=0), timeout=60).completion_tokens == 2
    http = server_for(engine)
    for content, error in (("exactly", "ZeroDivisionError"), ("x" * 150, "OverflowError")):
        reply = http.post("/v1/chat/completions", json={"model": "mathy", "messages": [{"role": "user", "content": content}]})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
        assert error in reply.json()["error"]["message"]
