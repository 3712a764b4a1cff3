"""The data pipeline's error: every message names the file and line (or row), what is wrong and the fix."""
from __future__ import annotations

from peftkit.errors import PeftkitError


class DataError(PeftkitError, ValueError):
    """Bad training data or data settings, e.g. `train.jsonl:41: 'messages' must be a list of {role, content}, got str`."""
