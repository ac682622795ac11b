"""Errors that reach users: a stable English code beside a Simplified Chinese message."""

from __future__ import annotations


class RegsandboxError(Exception):
    """An error with a machine-readable ``code`` and a Chinese ``message`` for the user.

    ``status`` is the HTTP status an API returns. The message names the value at
    fault and what to do, and never contains another institution's data.
    """

    status: int = 400

    def __init__(self, code: str, message: str, *, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        if status is not None:
            self.status = status

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "detail": self.message}


class ConfigurationError(RegsandboxError):
    """A setting or file that a service needs is missing or invalid; the service must not start."""

    status = 500
