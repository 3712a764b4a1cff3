"""The HTTP API against a live server on 127.0.0.1, with the official openai client where it applies."""
from __future__ import annotations

import time

import httpx
import openai
import pytest
from openai import OpenAI

from peftkit.serving.app import create_app
from peftkit.serving.server import start_background
from peftkit.serving.settings import ServeSettings

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "What colour is item 3?"}]


@pytest.fixture(scope="module")
def server(engine):
    """Return the base URL of a live server over the shared engine (small limits, two adapter labels)."""
    settings = ServeSettings(api_key=KEY, max_body_bytes=20_000, max_concurrent=4, retry_after_s=3, max_adapter_labels=2)
    running = start_background(create_app(engine, settings))
    yield running.url
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_chat_completion_with_usage(client, engine):
    reply = client.chat.completions.create(model="lora1", messages=USER, max_tokens=6, temperature=0)
    expected = engine.generate(_chat("lora1", 6))
    assert reply.object == "chat.completion" and reply.model == "lora1"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (expected.prompt_tokens, 6, expected.prompt_tokens + 6)


def test_streamed_chat_equals_whole_chat(client):
    whole = client.chat.completions.create(model="lora2", messages=USER, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="lora2", messages=USER, max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_completions_whole_and_streamed(client, tiny_model_dir):
    base = tiny_model_dir.name
    whole = client.completions.create(model=base, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="lora0:stable", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True))
    other = client.completions.create(model="lora0@2", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert streamed == other.choices[0].text != whole.choices[0].text


def test_models_lists_base_and_servable_adapters(client, tiny_model_dir):
    ids = {m.id for m in client.models.list()}
    assert {tiny_model_dir.name, "lora0", "lora0@1", "lora0@2", "lora0:stable", "dora0", "lora8"} <= ids
    assert {"ia3", "prefix0", "prompt0", "bottleneck0", "full0"} <= ids  # every peftkit method is served
    assert client.models.retrieve("lora0:stable").id == "lora0:stable"


def test_unknown_model_is_404_shaped_like_openai(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-adapter", messages=USER, max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_bad_or_missing_key_is_401_on_every_route_but_health(server):
    bad = OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="lora1", messages=USER, max_tokens=2)
    assert info.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/metrics", "/ready", "/no-such-route"):
        assert httpx.get(server + path).status_code == 401
        assert httpx.get(server + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    assert httpx.get(server + "/ready", headers=AUTH).json()["status"] == "ready"


def test_errors_have_openai_shape_and_status(server):
    post = lambda body: httpx.post(server + "/v1/chat/completions", headers=AUTH, json=body, timeout=30)  # noqa: E731
    missing = post({"model": "lora1"})
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "messages"
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    too_long = post({"model": "lora1", "messages": USER, "max_tokens": 10_000})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    two = post({"model": "lora1", "messages": USER, "n": 2})
    assert two.status_code == 400 and two.json()["error"]["param"] == "n"
    bad_json = httpx.post(server + "/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=b"{")
    assert bad_json.status_code == 400


def test_body_size_limit_is_413_with_or_without_content_length(server):
    big = {"model": "lora1", "messages": [{"role": "user", "content": "x" * 30_000}]}
    assert httpx.post(server + "/v1/chat/completions", headers=AUTH, json=big).status_code == 413

    def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(40):
            yield b" " * 1000
    response = httpx.post(server + "/v1/completions", headers=AUTH, content=chunks())
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_concurrency_limit_answers_429_with_retry_after(server, client, engine):
    cancelled = engine.snapshot()["finished"].get("cancelled", 0)
    streams = [client.chat.completions.create(model="lora3", messages=USER, max_tokens=300, stream=True) for _ in range(4)]
    try:
        for s in streams:
            next(iter(s))
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="lora3", messages=USER, max_tokens=2)
        assert info.value.response.headers["Retry-After"] == "3"
        assert info.value.body["code"] == "rate_limit_exceeded"
    finally:
        for s in streams:
            s.close()
    # The server frees a slot when it notices the disconnect, in the same step as it cancels the generation.
    _wait(lambda: engine.snapshot()["finished"].get("cancelled", 0) == cancelled + 4)
    assert client.chat.completions.create(model="lora3", messages=USER, max_tokens=2).usage.completion_tokens == 2


def test_client_disconnect_cancels_generation(server, engine):
    before = engine.snapshot()["finished"].get("cancelled", 0)
    body = {"model": "lora4", "messages": USER, "max_tokens": 400, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", headers=AUTH, json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    _wait(lambda: engine.snapshot()["finished"].get("cancelled", 0) == before + 1)
    assert engine.snapshot()["running_requests"] == 0
    tokens_before = engine.snapshot()["generated_tokens"]
    time.sleep(0.3)
    assert engine.snapshot()["generated_tokens"] == tokens_before  # nothing kept generating for the gone client


def test_metrics_count_requests_tokens_cache_with_bounded_labels(server, client):
    for model in ("lora5", "lora6", "lora7"):
        client.chat.completions.create(model=model, messages=USER, max_tokens=2, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="attacker-chosen-name", messages=USER, max_tokens=2)
    text = httpx.get(server + "/metrics", headers=AUTH).text
    adapters = {line.split('adapter="')[1].split('"')[0] for line in text.splitlines() if line.startswith("peftkit_adapter_requests_total")}
    assert len(adapters) <= 3 and "other" in adapters  # two labels, then "other"
    assert "attacker-chosen-name" not in text
    for series in ('peftkit_http_requests_total{route="/v1/chat/completions",status="200"}',
                   'peftkit_http_requests_total{route="/v1/chat/completions",status="404"}',
                   'peftkit_http_request_duration_seconds_bucket{le="0.5",route="/v1/chat/completions"}',
                   "peftkit_time_to_first_token_seconds_count", "peftkit_completion_tokens_total",
                   "peftkit_adapter_cache_hits_total", "peftkit_adapter_cache_misses_total",
                   "peftkit_adapter_cache_evictions_total", "peftkit_batch_rows_bucket", "peftkit_engine_ready 1.0"):
        assert series in text, series
    info = next(line for line in text.splitlines() if line.startswith("peftkit_engine_info{"))
    # The fixture's engine sets dtype fp32 and no thread count: the threads were measured at start.
    assert 'dtype="float32"' in info and 'dtype_source="--dtype fp32"' in info
    assert 'threads_source="measured: a decode-sized matmul took' in info
    assert int(info.split('threads="')[1].split('"')[0]) >= 1


def test_ready_is_503_until_the_engine_runs(tiny_model_dir, registry_dir):
    from fastapi.testclient import TestClient

    from peftkit.serving.engine import Engine

    idle = Engine(ServeSettings(str(tiny_model_dir), registry=str(registry_dir)))  # never started
    with TestClient(create_app(idle)) as http:
        assert http.get("/health").status_code == 200
        response = http.get("/ready")
        assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"
        assert http.post("/v1/completions", json={"model": "x", "prompt": "hi"}).status_code == 503


def _chat(model: str, max_tokens: int):
    from peftkit.serving.engine import GenerationRequest

    return GenerationRequest(model=model, messages=USER, max_tokens=max_tokens, temperature=0)


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
