"""Names, tags and references (`name`, `name@3`, `name:stable`) and safe relative file paths."""
from __future__ import annotations

import re
from dataclasses import dataclass

from peftkit.registry.errors import InvalidNameError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# One path segment of a stored file: no separators, no control characters, not '.' or '..'.
SEGMENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}$")
RULE = "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass(frozen=True)
class Ref:
    """A parsed reference: exactly one of version and tag is set, or neither (the latest)."""

    name: str
    version: int | None = None
    tag: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}:{self.tag}" if self.tag else self.name


def check_name(value: str, what: str = "name") -> str:
    """Return the value when it is a safe name, tag or domain; raise InvalidNameError otherwise."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidNameError(f"{what} {value!r} is not allowed; use {RULE} (no '/', no spaces, no '..')")
    return value


def parse_ref(text: str) -> Ref:
    """Return the Ref for `name`, `name@3` or `name:tag`."""
    if not isinstance(text, str):
        raise InvalidNameError(f"reference {text!r} must be a string such as my-adapter, my-adapter@3 or my-adapter:stable")
    name, at, version = text.partition("@")
    if at:
        if not version.isdigit() or int(version) < 1:
            raise InvalidNameError(f"reference {text!r}: the version after '@' must be a whole number from 1, e.g. {name}@3")
        return Ref(check_name(name, "name in reference"), version=int(version))
    name, colon, tag = text.partition(":")
    if colon:
        return Ref(check_name(name, "name in reference"), tag=check_name(tag, "tag in reference"))
    return Ref(check_name(name, "name in reference"))


def check_relpath(path: str, where: str = "file") -> str:
    """Return a stored file's relative path when safe: relative, '/'-separated, no '..', no odd characters."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise InvalidNameError(f"{where} path {path!r} must be relative and use '/' separators")
    for segment in path.split("/"):
        if not SEGMENT_RE.match(segment):
            raise InvalidNameError(
                f"{where} path {path!r}: segment {segment!r} is not allowed; use letters, digits, '.', '_', '+' or '-' "
                "and no '..' (rename the file)")
    return path
