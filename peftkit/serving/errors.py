"""Errors the serving engine raises; the HTTP layer maps each class to an OpenAI-shaped error and status."""
from __future__ import annotations

from peftkit.errors import PeftkitError


class ServingError(PeftkitError):
    """A request cannot be served; `param` names the request field at fault, when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownModelError(ServingError):
    """The requested model is neither the base model's name nor a reference the registry knows."""


class InvalidRequestError(ServingError):
    """A request's values cannot be served (prompt or max_tokens past the context, unsupported option)."""


class UnsupportedAdapterError(ServingError):
    """The adapter exists but this server cannot run it (method, base model or shape)."""


class AdapterMismatchError(UnsupportedAdapterError):
    """The adapter's files do not fit its own config or the served base (rank, targets, type or shapes)."""


class AdapterUnavailableError(ServingError):
    """The adapter's files could not be read or loaded just now (removed, changed or broken); other adapters are served."""


class OverloadedError(ServingError):
    """The server is at its concurrency limit; retry after a moment."""


class EngineUnavailableError(ServingError):
    """The engine is still loading, failed to load, has stopped, or its generation thread died or is stuck."""


class GenerationFailedError(ServingError):
    """The model failed while generating (for instance out of memory); the request was not completed."""


class ContextLengthError(InvalidRequestError):
    """The prompt, or the prompt plus max_tokens, does not fit the model's context."""


class MemoryBudgetError(InvalidRequestError):
    """The request's KV cache (prompt plus max_tokens), with its adapter's weights, can never fit the memory budget."""
