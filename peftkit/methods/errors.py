"""The error every method raises: it names the config key, the value and the fix."""
from __future__ import annotations

from peftkit.errors import PeftkitError


class MethodError(PeftkitError):
    """A method cannot be built or an adapter cannot be loaded."""
