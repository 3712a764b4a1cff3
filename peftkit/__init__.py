"""peftkit: parameter-efficient fine-tuning of Llama models, an adapter registry, and multi-adapter serving."""
__version__ = "0.1.0"
