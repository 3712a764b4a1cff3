"""The one exception family users see: each message names what is wrong and how to fix it."""


class PeftkitError(Exception):
    """Base class for errors the CLI prints as one line (no traceback) and exits with exit_code on."""

    exit_code = 2
