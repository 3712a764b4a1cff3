"""What a request may take before it is queued: its prompt and max_tokens against the context and the memory budget.

Both checks run on the caller's thread, before the request reaches the engine's queue, so that what
can never be served is refused at once with a 400 that names the limit and the fix. What fits the
budget alone but not beside the rows running now waits in the queue (peftkit.serving.engine).
"""
from __future__ import annotations

from peftkit.serving.errors import ContextLengthError, InvalidRequestError, MemoryBudgetError
from peftkit.serving.memory import MIB, Budget


def check_lengths(context: int, prompt_tokens: int, max_tokens: int | None, field_name: str) -> None:
    """Raise InvalidRequestError when the prompt, or prompt plus max_tokens, does not fit the context."""
    if prompt_tokens == 0:
        raise InvalidRequestError(f"the {field_name} is empty", param=field_name)
    if prompt_tokens >= context:
        raise ContextLengthError(f"This model's maximum context length is {context} tokens, but the {field_name} take "
                                 f"{prompt_tokens} tokens; shorten the {field_name}", param=field_name)
    if max_tokens is not None and prompt_tokens + max_tokens > context:
        raise ContextLengthError(f"This model's maximum context length is {context} tokens. However, you requested "
                                 f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {field_name}, "
                                 f"{max_tokens} in the completion); reduce max_tokens to at most "
                                 f"{context - prompt_tokens}", param="max_tokens")


def fit_memory(budget: Budget, context: int, prompt_tokens: int, max_tokens: int | None, virtual_tokens: int,
               adapter_bytes: int, ref: str | None, field_name: str) -> int:
    """Return the request's max_tokens (unset: what the context and the budget leave one row); MemoryBudgetError when
    its KV cache, beside its adapter's weights, can never fit the budget."""
    room = budget.tokens_left(adapter_bytes) - virtual_tokens - prompt_tokens
    wanted = max_tokens if max_tokens is not None else min(context - prompt_tokens, room)
    if wanted >= 1 and wanted <= room:
        return wanted
    need = virtual_tokens + prompt_tokens + max(wanted, 1)
    beside = f", beside the {adapter_bytes / MIB:.2f} MiB of adapter {ref}'s weights," if adapter_bytes else ""
    fix = f"reduce max_tokens to at most {room}" if room >= 1 else f"shorten the {field_name}"
    raise MemoryBudgetError(f"this request's KV cache takes {need} positions ({need * budget.per_token / MIB:.2f} MiB)"
                            f"{beside} more than the server's memory budget of {budget.total / MIB:.2f} MiB "
                            f"(kv_cache_mib / kv_cache_fraction); {fix}", param="max_tokens" if room >= 1 else field_name)
