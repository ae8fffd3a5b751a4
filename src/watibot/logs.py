"""Logging setup for the CLI and every worker process.

Processing lines carry `conversation`, `burst` and `fence` as `extra`; the text format appends them as
key=value pairs so a grep for one conversation finds its whole story.
"""

from __future__ import annotations

import logging
import sys

_CONTEXT_FIELDS = ("conversation", "burst", "fence")


class ContextFormatter(logging.Formatter):
    """The standard format plus any context fields the record carries."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{name}={getattr(record, name)}" for name in _CONTEXT_FIELDS if hasattr(record, name))
        return f"{line} [{context}]" if context else line


def configure_logging(level: str) -> None:
    """Send watibot's logs to stderr at `level` (idempotent: safe in the CLI and in each worker)."""
    logger = logging.getLogger("watibot")
    logger.setLevel(level.upper())
    if not any(getattr(handler, "_watibot", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(ContextFormatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
        handler._watibot = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
