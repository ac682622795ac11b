"""Logging set-up for the platform's processes.

Modules log through ``logging.getLogger(__name__)``; only a process entry point calls
:func:`configure_logging`, never an import.
"""

from __future__ import annotations

import logging
import re

_SECRET_PATTERN = re.compile(r"(?i)(authorization|token|password|secret)([\"']?\s*[:=]\s*[\"']?)([^\s\"',&]+)")


class SecretScrubber(logging.Filter):
    """Masks values that follow ``token=``, ``password:`` and similar keys in log messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = _SECRET_PATTERN.sub(r"\1\2***", message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


def configure_logging(level: int = logging.INFO) -> None:
    """Send records of all loggers to stderr with time, level and logger name, secrets masked."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(SecretScrubber())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
