"""Data pipeline: files -> rows -> conversations or text -> tokens with loss masks -> (packed) batches.

The public entry points are the ones training, generation and serving call:
`prepare`, `build_collator`, `build_prompt_ids`, `stop_token_ids`, `PreparedData` and `DataError`.
"""
from peftkit.data.errors import DataError
from peftkit.data.packing import build_collator
from peftkit.data.prepare import PreparedData, prepare
from peftkit.data.templates import build_prompt_ids, stop_token_ids

__all__ = ["DataError", "PreparedData", "build_collator", "build_prompt_ids", "prepare", "stop_token_ids"]
