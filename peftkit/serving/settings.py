"""What `peftkit serve` is told: one dataclass for the engine, the HTTP app and the command line alike.

Each field is documented by the string literal under it, and that string is the option's help text:
the CLI (peftkit.cli.serve_cmds) builds one option per field, named like the field (`max_batch_size`
is `--max-batch-size`; a True flag such as `mix` is turned off with `--no-mix`). No torch here, so
`peftkit serve --help` and the vLLM launch stay instant.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class ServeSettings:
    """The base model, its adapters' registry, the engine's batching and the HTTP side's address, auth and limits."""

    base: str = "smollm2-135m-instruct"
    """Base model: alias, local folder or hub id."""
    registry: str | None = None
    """Registry folder (default: $PEFTKIT_HOME/registry)."""
    served_name: str | None = None
    """Name clients use for the base model (default: the --base value or folder name)."""
    dtype: str = field(default="auto", metadata={"choices": DTYPES})
    """Weights and compute dtype: auto picks bf16 only where the hardware runs it fast, else fp32."""
    device: str | None = None
    """Device to load the model on, e.g. cuda:1 (default: the GPU when there is one, else the CPU)."""
    threads: int | None = None
    """Torch CPU threads (default on a CPU: one or every core, whichever ran a decode-sized matmul faster at start)."""
    max_loaded_adapters: int = 8
    """Adapters kept loaded at once (LRU)."""
    max_batch_size: int = 16
    """Requests generated together per step."""
    max_prefill_tokens: int = 512
    """Prompt tokens prefilled in one step at most (the first joining request always goes): requests beyond wait a step, so a burst of new requests does not freeze the ones decoding."""
    prefix_cache_mib: float | None = None
    """Memory in MiB for the keys and values of prompt heads that repeat (the chat template's system turn), so requests
    prefill only the rest of their prompt; counted in the memory budget (default: an eighth of it; 0 turns it off)."""
    batch_invariant: bool = False
    """Compute every request's forward so its answer does not depend on the other requests in its batch, in any dtype
    (bf16 included); costs throughput (docs/serving.md says how much) and turns the prompt-prefix cache off."""
    max_messages: int = 1024
    """Most messages in one chat request; more get 400 before the chat template is rendered."""
    max_prompt_chars: int | None = None
    """Most characters of prompt text in one request (message contents and system prompt, or a completion prompt); more
    get 400 before rendering or tokenizing (default: 16 per token of the model's context)."""
    kv_cache_fraction: float = 0.5
    """Share of the memory free once the base is loaded (GPU memory, else RAM) that KV caches and loaded adapters may use."""
    kv_cache_mib: float | None = None
    """Memory in MiB for KV caches and loaded adapters' weights; overrides --kv-cache-fraction."""
    stall_timeout_s: float = 120.0
    """Seconds without progress, while requests wait or run, after which /health and /ready report the engine wedged."""
    mix: bool = True
    """Mix the rows of LoRA, prefix and prompt adapters in one batch; --no-mix runs each adapter in its own batch."""
    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only; anything else requires an API key)."""
    port: int = 8000
    """Port to listen on."""
    api_key: str | None = field(default=None, repr=False, metadata={"env": "PEFTKIT_API_KEY"})  # kept out of logs
    """Bearer key required on every route but /health; none serves without authentication (loopback only)."""
    insecure_no_auth: bool = False
    """Allow listening beyond loopback without an API key."""
    max_concurrent: int = 64
    """Requests admitted at once, running or queued; more get 429 with Retry-After."""
    max_body_bytes: int = 1 << 20
    """Largest request body in bytes (1 MiB); larger ones get 413."""
    retry_after_s: int = 1
    """Seconds a client refused with 429 is told to wait."""
    max_adapter_labels: int = 32
    """Distinct adapter names given their own metrics label; the rest count as "other"."""
    runs: str = "runs"
    """Folder of training runs the web page at / shows, live while they train (each run's folder holds run.json)."""

    @property
    def base_name(self) -> str:
        """Return the name clients use for the base model."""
        return self.served_name or default_served_name(self.base)


def default_served_name(base: str) -> str:
    """Return the name clients use for the base: a local folder's (or file's) name, else what was given."""
    path = Path(base).expanduser()
    return (path.stem if path.is_file() else path.name) if path.exists() else base
