"""Chat prompts: sizes refused before any rendering, the template rendered once, and the ids training saw."""
from __future__ import annotations

import threading

import pytest

from peftkit.serving.engine import GenerationRequest
from peftkit.serving.errors import InvalidRequestError

TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}### assistant:\n{% endif %}")


def conversation(turns: int, content: str = "Where is my order, please?") -> list[dict[str, str]]:
    """Return user/assistant turns ending with a user turn."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{content} {i}"} for i in range(2 * (turns // 2) + 1)]


@pytest.fixture
def render_calls(engine, monkeypatch) -> list[int]:
    """Count the engine tokenizer's template renderings (one entry per call)."""
    calls, real = [], engine.tokenizer.apply_chat_template

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "apply_chat_template", counting)
    return calls


def test_a_chat_prompt_is_rendered_once_however_many_turns(engine, render_calls):
    # Rendering twice per assistant turn, each time up to that turn, made rendering quadratic in the turn count.
    engine.resolver.resolve("lora2")  # its stop tokens come from rendering a probe conversation once per adapter
    render_calls.clear()
    handle = engine.submit(GenerationRequest(model="lora2", messages=conversation(30, "ok"), max_tokens=1,
                                             temperature=0))
    handle.result(60)
    assert len(render_calls) == 1


def test_too_many_turns_or_characters_are_refused_before_rendering(engine, render_calls):
    with pytest.raises(InvalidRequestError, match="max_messages=1024") as info:
        engine.submit(GenerationRequest(model="lora2", messages=conversation(2000, "hi"), max_tokens=1))
    assert info.value.param == "messages"
    limit = 16 * engine.context_length  # the default: 16 characters per token of context
    with pytest.raises(InvalidRequestError, match=f"max_prompt_chars={limit}"):
        engine.submit(GenerationRequest(model="lora2", messages=[{"role": "user", "content": "x" * (limit + 1)}]))
    with pytest.raises(InvalidRequestError, match=f"max_prompt_chars={limit}"):
        engine.submit(GenerationRequest(model="lora2", prompt="x" * (limit + 1)))
    assert render_calls == []


def test_the_limits_are_settings(tiny_model_dir, registry_dir):
    from peftkit.serving.engine import Engine
    from peftkit.serving.settings import ServeSettings

    eng = Engine(ServeSettings(str(tiny_model_dir), registry=str(registry_dir), max_messages=3, max_prompt_chars=50)).start()
    try:
        with pytest.raises(InvalidRequestError, match="max_messages=3"):
            eng.submit(GenerationRequest(model="lora2", messages=conversation(4), max_tokens=1))
        with pytest.raises(InvalidRequestError, match="max_prompt_chars=50"):
            eng.submit(GenerationRequest(model="lora2", messages=[{"role": "user", "content": "y" * 51}], max_tokens=1))
        assert eng.generate(GenerationRequest(model="lora2", messages=conversation(2, "ok"), max_tokens=1), 60).completion_tokens
    finally:
        eng.stop()


@pytest.mark.parametrize("template", [None, TEMPLATE], ids=["tokenizer's ChatML", "custom"])
def test_served_prompt_ids_equal_the_ids_training_built(tokenizer, template):
    from peftkit.data import build_prompt_ids
    from peftkit.serving.prompts import chat_prompt_ids

    messages = conversation(9, "Tell me about boots:\n  sizes 40-46, and   returns?")
    served = chat_prompt_ids(tokenizer, threading.Lock(), messages, "You are Fernhill Support.", template,
                             max_messages=100, max_chars=100_000)
    assert served == build_prompt_ids(tokenizer, messages, system_prompt="You are Fernhill Support.", chat_template=template)


def test_unpaired_surrogates_get_400_not_500(engine, server_for):
    # Found by the HTTP fuzz: JSON's "\ud800" escape decodes to a lone surrogate, which the tokenizer cannot encode.
    http = server_for(engine)
    chat = b'{"model": "lora1", "max_tokens": 2, "messages": [{"role": "user", "content": "hi \\udfff there"}]}'
    reply = http.post("/v1/chat/completions", content=chat, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages[0].content"
    assert "unpaired surrogate (\\udfff" in reply.json()["error"]["message"]
    text = b'{"model": "lora1", "max_tokens": 2, "prompt": "\\ud800"}'
    reply = http.post("/v1/completions", content=text, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"
    parts = {"model": "lora1", "messages": [{"role": "user", "content": [{"type": "text"}]}]}
    reply = http.post("/v1/chat/completions", json=parts)  # a text part without its text: say so
    assert reply.status_code == 400 and "needs its 'text'" in reply.json()["error"]["message"]
