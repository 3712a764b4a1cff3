"""The baseline `peftkit serve` is measured against: transformers `generate` one request at a time, peft `set_adapter`.

This is what a user would write without a server: a FastAPI endpoint around `model.generate` behind a
lock. It runs in-process with no HTTP (which only flatters it), on the same requests the server gets:
the same base in the same dtype (`load_base`), the adapters' registry checkouts loaded into one
`PeftModel` (`from_pretrained` for the first, `load_adapter` for the rest), the prompt rendered by
`tokenizer.apply_chat_template(..., add_generation_prompt=True)` (for the bundled SmolLM2 these are
the ids the server renders), greedy, the same max_tokens and the same stop ids, so it generates the
same number of tokens (up to and including the stop token, or max_tokens).

Timing model: `concurrency` clients each send their first request at t=0 and their next one when their
previous answer comes back; one generate runs at a time, in arrival order. So request i is submitted
at t=0 when i < concurrency, else when request i - concurrency finishes, and its latency and time to
first token count the wait for the lock, as a client of such an endpoint would see them. Times to
first and last token are real: a streamer object records when `generate` emits each token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Timing:
    """One request's clock readings (time.perf_counter seconds) and its completion tokens."""

    sent: float
    first: float
    """When the first token (peftkit: the first non-empty content chunk) arrived."""
    last: float
    """When the last token arrived (peftkit: the chunk carrying finish_reason)."""
    done: float
    tokens: int


class _TokenClock:
    """A transformers streamer that only records when each put() happens: the prompt first, then every new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_naive(base: str, registry: str, names: list[str], dtype: str):
    """Return (PeftModel holding every adapter in names, tokenizer, {name: stop ids}) loaded as a user would."""
    from peft import PeftModel

    from peftkit.models import load_base, load_tokenizer
    from peftkit.prompting import read_prompting, stop_ids
    from peftkit.registry import Registry

    tokenizer = load_tokenizer(base)
    with Registry(registry) as reg:
        folders = {name: reg.checkout(name) for name in names}
        configs = {name: reg.show(name).config for name in names}
    model = PeftModel.from_pretrained(load_base(base, dtype=dtype), folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    # The stop ids the server would use for each adapter, so both stop after the same tokens.
    stops = {name: stop_ids(tokenizer, read_prompting(folders[name], configs[name] if isinstance(configs[name], dict)
                                                      else None)) for name in names}
    return model.eval(), tokenizer, stops


def generate_one(model, tokenizer, stops: list[int], name: str, messages: list[dict], max_tokens: int, sent: float) -> Timing:
    """Return the Timing of one greedy generate with adapter `name` active."""
    import torch
    from transformers import GenerationConfig

    model.set_adapter(name)
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt").to(model.device)
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=list(stops),
                              pad_token_id=tokenizer.pad_token_id)
    clock = _TokenClock()
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config, streamer=clock)
    done = time.perf_counter()
    # A batch of one stops at its stop token, so every new id is a completion token (the stop token included).
    return Timing(sent, clock.times[1], clock.times[-1], done, out.shape[1] - inputs["input_ids"].shape[1])


def request(i: int, models: list[str], prompts: list[str], system: str | None = None) -> tuple[str, list[dict]]:
    """Return request i's (model, chat messages), the same for the server and the naive loop: models in turn, and
    prompts shifted by one each round, so no adapter is always sent the same prompt (a prompt-prefix cache would
    flatter it); every request starts with the system message when one is given."""
    prompt = prompts[(i % len(models) + i // len(models)) % len(prompts)]
    return models[i % len(models)], ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]


def run_naive(base: str, registry: str, models: list[str], prompts: list[str], *, requests: int, concurrency: int,
              max_tokens: int, max_seconds: float, dtype: str = "auto", threads: int | None = None,
              system: str | None = None) -> tuple[list[Timing], float, int]:
    """Return (timings, wall seconds, unsent requests) for request(i, models, prompts), i < requests, served serially."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # as the engine does for its worker thread
    try:
        adapters = list(dict.fromkeys(models))
        model, tokenizer, stops = load_naive(base, registry, adapters, dtype)
        for name in adapters:  # load and first-call costs are not what this measures (the server is warmed too)
            generate_one(model, tokenizer, stops[name], name, request(0, [name], prompts, system)[1], 2, time.perf_counter())
        timings: list[Timing] = []
        started = time.perf_counter()
        for i in range(requests):
            sent = started if i < concurrency else timings[i - concurrency].done
            if time.perf_counter() >= started + max_seconds:
                break
            name, messages = request(i, models, prompts, system)
            timings.append(generate_one(model, tokenizer, stops[name], name, messages, max_tokens, sent))
        wall = time.perf_counter() - started
        return timings, wall, requests - len(timings)
    finally:
        torch.set_num_threads(previous)
