"""The HTTP layer: OpenAI-compatible routes over an Engine, with auth, limits, errors and metrics. No model code.

    app = create_app(Engine(settings).start(), settings)      # settings: a ServeSettings

Every route but /health and the web page's shell (peftkit.dashboard: / and its static files, which
hold no data) needs `Authorization: Bearer KEY` when a key is set (compared in constant time).
POST bodies are read whole up to a size limit before any route sees them. Generation requests
past the concurrency limit get 429 with Retry-After. A client that disconnects cancels its
generation, streamed or not.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftkit.dashboard import Dashboard, add_dashboard, is_public
from peftkit.serving import openai_schema as oai
from peftkit.serving.errors import (AdapterUnavailableError, ContextLengthError, EngineUnavailableError,
                                    GenerationFailedError, InvalidRequestError, MemoryBudgetError, OverloadedError,
                                    ServingError, UnknownModelError, UnsupportedAdapterError)
from peftkit.serving.guard import Guard
from peftkit.serving.metrics import Metrics
from peftkit.serving.settings import ServeSettings

# (error class, HTTP status, OpenAI error type, code); the first match wins.
ERRORS = (
    (UnknownModelError, 404, "invalid_request_error", "model_not_found"),
    (UnsupportedAdapterError, 400, "invalid_request_error", "model_not_supported"),
    (ContextLengthError, 400, "invalid_request_error", "context_length_exceeded"),
    (MemoryBudgetError, 400, "invalid_request_error", "kv_cache_budget_exceeded"),
    (InvalidRequestError, 400, "invalid_request_error", None),
    (OverloadedError, 429, "requests", "rate_limit_exceeded"),
    (AdapterUnavailableError, 503, "server_error", "adapter_unavailable"),
    (EngineUnavailableError, 503, "server_error", "engine_unavailable"),
    (GenerationFailedError, 500, "server_error", None),
    (ServingError, 400, "invalid_request_error", None),
)


# Engine states /health answers 503 for (while loading it answers 200: the process is fine, the model is on its way).
UNHEALTHY = {"failed": "the engine is not running: the model failed to load or its generation thread died; see /ready",
             "stuck": "the engine has made no progress while requests wait; see /ready",
             "stopped": "the engine has stopped"}


def error_fields(exc: ServingError) -> tuple[int, str, str | None]:
    """Return the HTTP status, OpenAI error type and code of a ServingError."""
    return next((s, t, c) for cls, s, t, c in ERRORS if isinstance(exc, cls))


def error_response(exc: ServingError) -> JSONResponse:
    """Return the OpenAI-shaped error response and status for a ServingError."""
    status, type_, code = error_fields(exc)
    return JSONResponse(oai.error_body(str(exc), type_, exc.param, code), status_code=status)


def create_app(engine, settings: ServeSettings | None = None) -> FastAPI:
    """Return the FastAPI app serving `engine` with the settings' auth and limits."""
    settings = settings or ServeSettings()
    metrics = Metrics(engine, settings.max_adapter_labels)
    app = FastAPI(title="peftkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes, metrics=metrics,
                       public=is_public)  # the page shell holds no data; its JSON routes need the key
    add_error_handlers(app, settings.retry_after_s)
    add_status_routes(app, engine, metrics)
    add_model_routes(app, engine)
    add_generation_routes(app, engine, Slots(settings.max_concurrent, settings.retry_after_s, metrics), metrics)
    add_dashboard(app, Dashboard(runs=Path(settings.runs), registry=settings.registry, api_key=settings.api_key,
                                 playground=True))
    return app


def add_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Answer every error in OpenAI's shape: ServingErrors by their class, bad bodies, unknown routes, crashes."""

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError):
        response = error_response(exc)
        if isinstance(exc, OverloadedError):
            response.headers["Retry-After"] = str(retry_after_s)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(oai.error_body("The request body is not valid JSON", "invalid_request_error"), 400)
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(oai.error_body(message, "invalid_request_error", param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = "Not found: see /v1/models, /v1/chat/completions, /v1/completions" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(oai.error_body(message, "invalid_request_error"), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return JSONResponse(oai.error_body("The server had an error while processing your request", "server_error"), 500)


def add_status_routes(app: FastAPI, engine, metrics: Metrics) -> None:
    """Add /health (the process answers), /ready (the model is loaded) and /metrics (Prometheus)."""

    @app.get("/health")
    async def health():
        status, _ = engine.state()
        if status in UNHEALTHY:  # /health needs no key: it says what is wrong, /ready says the details
            body = oai.error_body(UNHEALTHY[status], "server_error", None, "engine_unavailable")
            return JSONResponse({**body, "status": status}, status_code=503)
        return {"status": "ok" if status == "ready" else status}

    @app.get("/ready")
    async def ready():
        _require_ready(engine)
        return {"status": "ready", "model": engine.served_name}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def add_model_routes(app: FastAPI, engine) -> None:
    """Add /v1/models and /v1/models/{model}: the base and every registry reference the server can run."""
    created = int(time.time())

    @app.get("/v1/models")
    async def list_models():
        _require_ready(engine)
        models = await run_in_threadpool(engine.list_models)
        return {"object": "list", "data": [_model_card(m, engine.served_name, created) for m in models]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str):
        _require_ready(engine)
        models = await run_in_threadpool(engine.list_models)
        found = next((m for m in models if m["id"] == model), None)
        if found is None:
            raise UnknownModelError(f"The model `{model}` does not exist", param="model")
        return _model_card(found, engine.served_name, created)


def add_generation_routes(app: FastAPI, engine, slots: Slots, metrics: Metrics) -> None:
    """Add /v1/chat/completions and /v1/completions, streamed or whole, within the concurrency slots."""

    @app.post("/v1/chat/completions")
    async def chat(body: oai.ChatCompletionRequest, request: Request):
        return await _generate("chat", body, request, engine, slots, metrics)

    @app.post("/v1/completions")
    async def completions(body: oai.CompletionRequest, request: Request):
        return await _generate("text", body, request, engine, slots, metrics)


class Slots:
    """The concurrency limit: generation requests admitted and not yet finished, at most `limit`."""

    def __init__(self, limit: int, retry_after_s: int, metrics: Metrics):
        self.limit, self.retry_after_s, self.metrics = limit, retry_after_s, metrics
        self.in_flight = 0

    def take(self) -> Callable[[], None]:
        """Return the function that frees the slot taken (safe to call twice); OverloadedError when none is free."""
        if self.in_flight >= self.limit:
            self.metrics.rejected.labels("concurrency").inc()
            raise OverloadedError(f"the server is at its limit of {self.limit} concurrent requests; "
                                  f"retry after {self.retry_after_s} s")
        self.in_flight += 1
        self.metrics.in_flight.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self.metrics.in_flight.dec()
        return release


async def _generate(kind: str, body, request: Request, engine, slots: Slots, metrics: Metrics):
    """Return the response to one generation request: an event stream, or the whole completion once finished."""
    started = time.perf_counter()
    release = slots.take()
    try:
        _require_ready(engine)
        queue: asyncio.Queue = asyncio.Queue()
        handle = await run_in_threadpool(engine.submit, body.to_engine(), _enqueue(queue))
    except BaseException:
        release()
        raise
    run = _Run(kind, oai.new_id(kind), body.model, handle, queue, metrics, request.url.path, started)
    if body.stream:
        return ClosingStream(run.sse(request, body.include_usage, release), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text, last = await run.collect(request)
    finally:
        release()
    if last is None:  # the client left; nobody reads this
        return Response(status_code=499)
    if last.error is not None:
        raise last.error
    return JSONResponse(oai.completion_body(kind, run.rid, body.model, text, last.finish_reason,
                                            handle.prompt_tokens, last.completion_tokens))


def _enqueue(queue: asyncio.Queue) -> Callable:
    loop = asyncio.get_running_loop()

    def on_event(event):  # called on the engine's thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass
    return on_event


class _Run:
    """One generation request on the HTTP side: reads its engine events, streams or collects them, counts them."""

    def __init__(self, kind, rid, model, handle, queue, metrics, route, started):
        self.kind, self.rid, self.model, self.handle, self.queue = kind, rid, model, handle, queue
        self.metrics, self.route, self.started, self.first = metrics, route, started, True

    def _seen(self, event) -> None:
        if self.first and event.text:
            self.first = False
            self.metrics.ttft.labels(self.route).observe(time.perf_counter() - self.started)
        if event.finish_reason:
            self.metrics.record_generation(self.handle.profile.name, event.finish_reason, self.handle.prompt_tokens,
                                           event.completion_tokens)

    async def next_event(self, gone: asyncio.Future):
        """Return the next engine event, or None (after cancelling the generation) once the client is gone."""
        get = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        if get not in done:
            get.cancel()
            self.handle.cancel()
            return None
        event = get.result()
        self._seen(event)
        return event

    async def collect(self, request: Request):
        """Return (text, last event), or ("", None) after cancelling when the client disconnects first."""
        parts = []
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while (event := await self.next_event(gone)) is not None:
                parts.append(event.text)
                if event.finish_reason:
                    return "".join(parts), event
            return "", None
        finally:
            gone.cancel()

    async def sse(self, request: Request, include_usage: bool, release):
        """Yield server-sent events: chunks, a final chunk with finish_reason, optional usage, then [DONE]."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            if self.kind == "chat":
                yield _data(oai.chunk_body("chat", self.rid, self.model, "", None, first=True))
            while (event := await self.next_event(gone)) is not None:
                if event.error is not None:
                    _, type_, code = error_fields(event.error)
                    yield _data(oai.error_body(str(event.error), type_, event.error.param, code))
                    break
                if event.text:
                    yield _data(oai.chunk_body(self.kind, self.rid, self.model, event.text, None))
                if event.finish_reason:
                    yield _data(oai.chunk_body(self.kind, self.rid, self.model, None, event.finish_reason))
                    if include_usage:
                        yield _data(oai.usage_chunk(self.kind, self.rid, self.model, self.handle.prompt_tokens,
                                                    event.completion_tokens))
                    yield "data: [DONE]\n\n"
                    break
        finally:  # runs when the client disconnects too (see ClosingStream)
            gone.cancel()
            if not self.handle.done.is_set():
                self.handle.cancel()
            release()


class ClosingStream(StreamingResponse):
    """A StreamingResponse that always closes its body generator, so the generator's cleanup runs at once.

    Starlette stops iterating when a send fails on a closed connection but leaves the generator
    open until garbage collection; its `finally` (cancel the generation, free the concurrency slot)
    would run at some unknown later time.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _require_ready(engine) -> None:
    status, why = engine.state()
    if status != "ready":
        raise EngineUnavailableError(why)


def _model_card(m: dict[str, Any], base: str, created: int) -> dict[str, Any]:
    return {"id": m["id"], "object": "model", "created": created, "owned_by": "peftkit",
            "root": m["ref"] or m["id"], "parent": None if m["ref"] is None else base,
            "method": m["method"], "domain": m["domain"], "tags": m["tags"]}
