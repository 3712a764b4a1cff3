"""Fuzz the HTTP API of `peftkit serve` with generated hostile requests; no request may get a 5xx or hang.

    python -m peftkit.bench.fuzz_http --requests 2000 --seed 1

Builds a tiny random Llama (the bundled tokenizer), a registry with adapters of every method, an engine
and a server on 127.0.0.1 in this process, then sends generated requests (Hypothesis strategies below),
up to four at a time: bad types, huge and tiny numbers, NaN and Infinity as raw JSON tokens, unicode
and lone surrogates, missing and extra fields, long and deeply nested messages, bad auth, wrong content
types, broken JSON, bodies over the size limit, streams read whole or dropped after the first line.
It prints the count of each status, the slowest request, and the growth of this process's memory,
then checks that the engine still answers a normal request. It exits 1 on any 5xx (or a stream's
server_error event), any request past --timeout, or memory growth past --max-rss-growth-mib.
tests/serving/test_fuzz_http.py runs the same strategies, fewer of them, with a fixed seed.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from hypothesis import strategies as st

KEY = "fuzz-key"
NUMBERS = st.one_of(
    st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, -(2**63), -(2**64), 10**30, -(10**30),
                     1e-40, 5e-324, -0.0, 1e308, 2.0000001, 1e-5, 0.99999, float("nan"), float("inf"), float("-inf")]))
TEXT = st.one_of(
    st.text(max_size=40), st.text(st.characters(codec="utf-8"), max_size=20),
    st.sampled_from(["", " ", "\x00", "\ud800", "\udfff", "🙂" * 300, "<|im_end|>", "<|im_start|>system\n", "<|endoftext|>",
                     "{{ 1/0 }}", "{% for %}", "x" * 5000, "\u202e\u0301", "\n" * 300, "é" * 2000, "ﷺ" * 500]))
ANY = st.recursive(st.one_of(st.none(), st.booleans(), NUMBERS, TEXT),
                   lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
                   max_leaves=10)


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Return a strategy drawing from each (weight, strategy) in proportion to its weight (st.one_of would not:
    it merges repeated strategies)."""
    picks = [i for i, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(picks).flatmap(lambda i: choices[i][1])


def sometimes(valid: st.SearchStrategy, hostile: st.SearchStrategy = ANY) -> st.SearchStrategy:
    """Return a strategy drawing from valid 15 times out of 16, else from hostile (so that, with a dozen fields, a fair
    share of requests gets past validation and into the engine)."""
    return weighted((15, valid), (1, hostile))


ROLE = sometimes(st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "developer"]), TEXT)
PART = st.fixed_dictionaries({"type": sometimes(st.sampled_from(["text", "image_url"]), TEXT), "text": sometimes(TEXT)})
WORDS = st.text(min_size=1, max_size=60)
CONTENT = sometimes(st.one_of(WORDS, WORDS, TEXT), st.one_of(st.lists(PART, max_size=3), ANY))
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": CONTENT}, optional={"name": TEXT, "tool_calls": ANY})
MESSAGES = weighted((6, st.lists(MESSAGE, min_size=1, max_size=5)), (1, st.builds(lambda n, m: [m] * n, st.integers(1, 3000), MESSAGE)),
                    (1, ANY))
SAMPLING = {
    "max_tokens": sometimes(st.one_of(st.integers(1, 12), st.sampled_from([64, 480, 512, 10**9])), NUMBERS),
    "temperature": sometimes(st.one_of(st.floats(0, 2), st.sampled_from([0, 1e-40, 5e-324, 2])), NUMBERS),
    "top_p": sometimes(st.floats(0, 1, exclude_min=True), NUMBERS),
    "stop": sometimes(st.one_of(TEXT, st.lists(TEXT, max_size=4)), st.lists(TEXT, min_size=5)),
    "seed": sometimes(st.integers(-(2**63), 2**64 - 1), NUMBERS),
    "stream": sometimes(st.booleans()),
    "stream_options": sometimes(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "n": sometimes(st.sampled_from([None, 1]), st.sampled_from([2, 0, -1])), "logprobs": sometimes(st.sampled_from([None, False])),
    "presence_penalty": sometimes(st.sampled_from([None, 0, 0.0]), NUMBERS),
    "frequency_penalty": sometimes(st.sampled_from([None, 0]), NUMBERS), "logit_bias": sometimes(st.sampled_from([None, {}])),
    "user": sometimes(st.text(max_size=20)), "unknown_field": ANY,
}
CHAT_ONLY = {"max_completion_tokens": sometimes(st.integers(1, 12), NUMBERS), "tools": sometimes(st.none()),
             "response_format": sometimes(st.just({"type": "text"}), st.just({"type": "json_object"}))}
PROMPT = weighted((4, WORDS), (2, TEXT), (1, st.lists(st.integers(-5, 60_000), max_size=20)),
                  (1, st.lists(st.lists(st.integers(0, 49_151), max_size=8), max_size=2)), (1, st.lists(TEXT, max_size=2)), (1, ANY))
TEXT_ONLY = {"echo": sometimes(st.sampled_from([None, False])), "suffix": sometimes(st.none()),
             "best_of": sometimes(st.sampled_from([1, 2]), NUMBERS)}


@dataclass
class FuzzRequest:
    """One request to send: its method, path, headers and body, and whether to drop a stream after its first line."""

    method: str
    path: str
    headers: dict[str, bytes] = field(default_factory=dict)
    body: bytes | None = None
    drop_stream: bool = False


def bodies(models: list[str]) -> st.SearchStrategy:
    """Return a strategy of (path, JSON-ready body) for the two generation routes, valid or broken."""
    model = sometimes(st.sampled_from(models), TEXT)
    chat = {"model": model, "messages": MESSAGES}
    text = {"model": model, "prompt": PROMPT}
    chat_route, text_route = st.just("/v1/chat/completions"), st.just("/v1/completions")
    return weighted((6, st.tuples(chat_route, st.fixed_dictionaries(chat, optional={**SAMPLING, **CHAT_ONLY}))),
                    (1, st.tuples(chat_route, st.fixed_dictionaries({}, optional={**chat, **SAMPLING, **CHAT_ONLY}))),
                    (4, st.tuples(text_route, st.fixed_dictionaries(text, optional={**SAMPLING, **TEXT_ONLY}))),
                    (1, st.tuples(text_route, st.fixed_dictionaries({}, optional={**text, **SAMPLING, **TEXT_ONLY}))),
                    (1, st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), ANY)))


def raw_bodies() -> st.SearchStrategy:
    """Return a strategy of bodies that are not JSON objects: garbage, truncated, deeply nested, oversized."""
    deep = st.builds(lambda n: b'{"model":"lora1","messages":' + b"[" * n + b"]" * n + b"}", st.integers(1, 200_000))
    return st.one_of(st.binary(max_size=300), deep, st.integers(1, 3 << 20).map(lambda n: b" " * n),
                     st.sampled_from([b"", b"null", b"[]", b'"x"', b"1e999999", b'{"model": NaN, "messages": Infinity}',
                                      b'{"model":"lora1","messages":[{"role":"user","content":"hi"}],"temperature":-0.0}',
                                      b'{"model":"lora1","model":"lora2","messages":[{"role":"user","content":"\\ud800"}]}']))


def encode(body: object, ascii_only: bool, cut: int | None) -> bytes:
    """Return the body as JSON bytes: NaN and Infinity as raw tokens, lone surrogates escaped or (ascii_only off) raw."""
    data = json.dumps(body, allow_nan=True, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    return data[:cut] if cut is not None else data


def requests(models: list[str]) -> st.SearchStrategy:
    """Return a strategy of FuzzRequests: mostly generation calls, some other routes, methods, headers and bodies."""
    auth = st.sampled_from([f"Bearer {KEY}"] * 40 + [None, "Bearer wrong", f"bearer {KEY}", f"Basic {KEY}", "Bearer",
                                                       f"Bearer {KEY} extra", "Bearer \u00e9"])
    content_type = st.sampled_from(["application/json"] * 20 + [None, "text/plain", "application/x-www-form-urlencoded",
                                                               "multipart/form-data; boundary=x", "application/json; charset=utf-16"])
    json_post = st.builds(lambda pb, a, c: ("POST", pb[0], encode(pb[1], a, c)), bodies(models), st.booleans(),
                          weighted((7, st.none()), (1, st.integers(0, 60))))
    raw_post = st.builds(lambda p, b: ("POST", p, b), st.sampled_from(["/v1/chat/completions", "/v1/completions"]), raw_bodies())
    other = st.builds(lambda m, p: (m, p, None), st.sampled_from(["GET", "GET", "DELETE", "PUT", "HEAD", "OPTIONS"]),
                      st.one_of(st.sampled_from(["/v1/models", "/health", "/ready", "/metrics", "/v1/chat/completions", "/",
                                                 "/v1/models/lora0:stable", "/docs", "/openapi.json"]),
                                TEXT.map(lambda t: "/v1/models/" + quote(t.encode("utf-8", "surrogatepass"), safe=""))))
    call = weighted((6, json_post), (1, raw_post), (1, other))
    return st.builds(_request, call, auth, content_type, st.integers(0, 4))


def _request(call: tuple, auth: str | None, content_type: str | None, drop: int) -> FuzzRequest:
    method, path, body = call
    headers = {k: v.encode() for k, v in (("Authorization", auth), ("Content-Type", content_type)) if v is not None}
    return FuzzRequest(method, path, headers, body, drop_stream=drop == 0)


@dataclass
class Outcome:
    """What one request got: its status, how long it took, and a server error if it met one (5xx or a stream's)."""

    status: int | str
    seconds: float
    server_error: str | None = None


def send(client, request: FuzzRequest, timeout: float, body_limit: int) -> Outcome:
    """Send one request, reading a stream to its end (or dropping it), and return what it got."""
    import httpx

    started = time.perf_counter()
    try:
        with client.stream(request.method, request.path, headers=request.headers, content=request.body,
                           timeout=httpx.Timeout(timeout)) as response:
            error = _read(response, request.drop_stream, started + timeout)
    except httpx.TimeoutException:
        return Outcome("timeout", time.perf_counter() - started, f"no answer within {timeout} s")
    except httpx.TransportError as exc:  # the server may cut off a body over its limit; nothing else
        oversized = request.body is not None and len(request.body) > body_limit
        return Outcome("cut off", time.perf_counter() - started, None if oversized else f"connection dropped: {exc!r}")
    seconds = time.perf_counter() - started
    if seconds > timeout:
        return Outcome("timeout", seconds, f"took {seconds:.1f} s")
    if response.status_code >= 500:
        error = f"{response.status_code}: {error or ''}"
    return Outcome(response.status_code, seconds, error)


def _read(response, drop: bool, deadline: float) -> str | None:
    """Read a response; return a server error found in it (a 5xx body, or a stream's server_error event)."""
    if "text/event-stream" not in response.headers.get("content-type", ""):
        body = response.read()
        return body[:300].decode("utf-8", "replace") if response.status_code >= 500 else None
    for line in response.iter_lines():
        if drop or time.perf_counter() > deadline:
            return None
        if line.startswith("data: {") and '"error"' in line:
            event = json.loads(line[len("data: "):]).get("error", {})
            if event.get("type") == "server_error":
                return f"stream error: {event.get('message')}"
    return None


def rss_mib() -> float:
    """Return this process's resident memory in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Campaign:
    """Sends generated requests to a server, up to four at once, and tallies what came back."""

    def __init__(self, url: str, timeout: float, body_limit: int):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=timeout)
        self.timeout, self.body_limit = timeout, body_limit
        self.pool = ThreadPoolExecutor(4)
        self.statuses: collections.Counter = collections.Counter()
        self.failures: list[tuple[FuzzRequest, Outcome]] = []
        self.sent, self.slowest = 0, 0.0
        self.rss = [(0, rss_mib())]  # (requests sent, MiB): growth that levels off is warm-up, steady growth a leak

    def run(self, batch: list[FuzzRequest]) -> list[Outcome]:
        """Send a batch of requests concurrently and record their outcomes."""
        outcomes = list(self.pool.map(lambda r: send(self.client, r, self.timeout, self.body_limit), batch))
        for request, outcome in zip(batch, outcomes):
            self.sent += 1
            self.statuses[outcome.status] += 1
            self.slowest = max(self.slowest, outcome.seconds)
            if outcome.server_error:
                self.failures.append((request, outcome))
            if self.sent % 500 == 0:
                self.rss.append((self.sent, rss_mib()))
        return outcomes

    def growth(self) -> float:
        """Return how much this process's memory grew since the campaign began, in MiB."""
        return rss_mib() - self.rss[0][1]

    def close(self) -> None:
        self.pool.shutdown()
        self.client.close()


class _Enough(Exception):
    """Raised inside the property once enough requests are sent, to end Hypothesis's run early."""


def fuzz(campaign: Campaign, models: list[str], count: int, seed: int | None) -> None:
    """Send at least count generated requests, drawn from seed, or derandomized when seed is None (the same seed, or
    no seed, sends the same requests each run)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as with_seed

    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate], derandomize=seed is None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(requests(models), min_size=1, max_size=4))
    def one_batch(batch):
        if campaign.sent >= count:
            raise _Enough
        campaign.run(batch)

    try:
        (one_batch if seed is None else with_seed(seed)(one_batch))()
    except _Enough:
        pass


def build_setup(workdir: Path) -> tuple[str, str, list[str]]:
    """Return (base folder, registry folder, model names): a tiny random Llama and an adapter of every method."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peftkit.bench.serve_load import OTHER_METHODS, random_method_adapter
    from peftkit.models import resolve_model
    from peftkit.registry import Registry

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512, initializer_range=0.2,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    base = workdir / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(base)
    tok.save_pretrained(base)
    registry, names = Registry(workdir / "registry"), []
    for i, method in enumerate(("lora", "lora", *OTHER_METHODS)):
        name = f"{method}{i}"
        folder = random_method_adapter(base, workdir / name, method, seed=i, scale=0.02 if method == "full" else 0.5,
                                       num_virtual_tokens=5, reduction_factor=8)
        registry.add(folder, name=name, tags=["stable"] if i == 0 else (), base_model_dir=base)
        names.append(name)
    registry.close()
    return str(base), str(workdir / "registry"), [base.name, *names, f"{names[0]}:stable", f"{names[0]}@1"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="requests to send (at least)")
    p.add_argument("--seed", type=int, default=0, help="Hypothesis seed: the same seed sends the same requests")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take before it counts as a hang")
    p.add_argument("--max-rss-growth-mib", type=float, default=500.0, help="memory growth allowed over the run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the engine")
    p.add_argument("--kv-cache-mib", type=float, help="the server's memory budget (default: the server's default)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from peftkit.bench.serve_load import machine
    from peftkit.serving.app import create_app
    from peftkit.serving.engine import Engine, GenerationRequest
    from peftkit.serving.server import start_background
    from peftkit.serving.settings import ServeSettings

    with tempfile.TemporaryDirectory(prefix="peftkit-fuzz-") as tmp:
        base, registry, models = build_setup(Path(tmp))
        settings = ServeSettings(base, registry=registry, dtype="fp32", api_key=KEY, threads=args.threads,
                                 max_loaded_adapters=len(models), kv_cache_mib=args.kv_cache_mib)
        engine = Engine(settings).start()
        server = start_background(create_app(engine, settings))
        greedy = GenerationRequest(model=models[1], messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
        before = engine.generate(greedy, timeout=60).token_ids
        campaign = Campaign(server.url, args.timeout, settings.max_body_bytes)
        try:
            started = time.perf_counter()
            fuzz(campaign, models, args.requests, args.seed)
            wall, growth = time.perf_counter() - started, campaign.growth()
            after = engine.generate(greedy, timeout=60).token_ids
        finally:
            campaign.close()
            server.stop()
            engine.stop()
    return report(args, campaign, wall, growth, before == after, machine())


def report(args, campaign: Campaign, wall: float, growth: float, same_answer: bool, where: str) -> int:
    """Print the tally and return the exit code: 0 when no 5xx, no hang, bounded memory and the engine still answers."""
    print(f"machine: {where}")
    print(f"python -m peftkit.bench.fuzz_http --requests {args.requests} --seed {args.seed}: {campaign.sent} requests "
          f"in {wall:.0f} s")
    print("status counts: " + ", ".join(f"{s}: {n}" for s, n in sorted(campaign.statuses.items(), key=lambda x: str(x[0]))))
    print(f"slowest request: {campaign.slowest:.2f} s (limit {args.timeout:g} s); memory growth: {growth:.0f} MiB "
          f"(limit {args.max_rss_growth_mib:g} MiB); same greedy answer after the run: {same_answer}")
    start = campaign.rss[0][1]
    print("memory growth by requests sent: " + ", ".join(f"{n}: +{mib - start:.0f} MiB" for n, mib in campaign.rss[1:]))
    for request, outcome in campaign.failures[:20]:
        size = len(request.body or b"")
        print(f"FAILED {request.method} {request.path} {request.headers} ({size} bytes) {(request.body or b'')[:200]!r}: "
              f"{outcome.server_error}")
    ok = not campaign.failures and growth <= args.max_rss_growth_mib and same_answer
    print("no 5xx, no hang" if not campaign.failures else f"{len(campaign.failures)} requests met a server error or hang")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
