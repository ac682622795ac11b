"""Errors raised by the sandbox helper library; each has an English ``code`` and a Chinese message."""

from __future__ import annotations

from regsandbox_core.errors import RegsandboxError


class SandboxAccessError(RegsandboxError, PermissionError):
    """A query tried to read or write a file outside the institution's extract folder."""

    status = 403

    def __init__(self, code: str, message: str, *, path: str | None = None) -> None:
        super().__init__(code, message)
        self.path = path


class ExtractNotConfiguredError(RegsandboxError):
    """The sandbox has no usable extract: variable unset, folder or manifest missing or inconsistent."""

    status = 500


class UnknownTableError(RegsandboxError, KeyError):
    """The requested table is not listed in the extract's manifest."""

    status = 404

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return f"{self.code}: {self.message}"


class InvalidNameError(RegsandboxError, ValueError):
    """An experiment or model name is empty."""
