"""Errors the registry raises; each message names what is wrong and how to fix it."""
from __future__ import annotations

from peftkit.errors import PeftkitError


class RegistryError(PeftkitError):
    """Something about the registry or a request to it is wrong."""


class InvalidNameError(RegistryError, ValueError):
    """A name, tag, domain, reference or archive path uses characters the registry refuses."""


class UnknownRefError(RegistryError, KeyError):
    """A reference names no registered adapter; the message lists close names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class PickleRefusedError(RegistryError):
    """A pickle-based weights file was offered; pickle is never loaded."""


class AdapterValidationError(RegistryError, ValueError):
    """An adapter's files or tensor shapes do not fit its config or its base model."""


class BaseMismatchError(RegistryError):
    """The adapter was trained on another base than earlier versions of its name."""


class ArchiveError(RegistryError):
    """An export archive is unsafe, incomplete or corrupt."""
