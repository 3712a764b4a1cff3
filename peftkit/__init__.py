"""peftkit: parameter-efficient fine-tuning of Llama models, an adapter registry, and multi-adapter serving."""
import logging

__version__ = "0.1.0"

# bitsandbytes warns at import, on every CPU with AVX512-BF16, that an optional kernel package it would
# download from the Hub is missing; nothing a user of peftkit did asked for it. Its errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
