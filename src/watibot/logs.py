"""Logging setup for the CLI and every worker process: readable text, or JSON lines (`WATIBOT_LOG_FORMAT=json`).

Processing lines carry `conversation`, `burst` and `fence` as `extra`; every line of a worker process also
carries its sweeper's `worker` id. The text format appends them as key=value pairs so a grep for one
conversation finds its whole story; the JSON format makes them fields.

What is never logged: secrets (the passkey travels in the webhook URL, so uvicorn's access log stays off and
httpx's request lines are silenced) and, at info level and above, what customers wrote or what the agent replied.
`WATIBOT_ACCESS_LOG=true` adds watibot's own access log (`AccessLog`): method, path, status and milliseconds,
never the query string.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_CONTEXT_FIELDS = ("conversation", "burst", "fence", "worker")
# Characters that would let text a customer wrote forge a log line or drive a terminal: C0 and C1 controls (ESC,
# newline, carriage return…), DEL, the line and paragraph separators and the bidirectional overrides.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """`text` with every control character spelled as an escape (`\\x1b`, `\\n`, `\\u202e`), the rest as is."""
    return _INVISIBLE.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)
_worker_id: str | None = None


def set_worker(worker_id: str | None) -> None:
    """Stamp every later line of this process with the sweeper's worker id."""
    global _worker_id  # noqa: PLW0603 - one sweeper per process: the id is process-wide by nature
    _worker_id = worker_id


def _context(record: logging.LogRecord) -> dict[str, Any]:
    context = {name: getattr(record, name) for name in _CONTEXT_FIELDS if hasattr(record, name)}
    if "worker" not in context and _worker_id is not None:
        context["worker"] = _worker_id
    return context


class ContextFormatter(logging.Formatter):
    """The standard text format plus any context fields the record carries."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        """One line whatever the message holds: control characters are escaped (a traceback, appended after
        this, keeps its lines)."""
        record.message = visible(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{name}={visible(str(value))}" for name, value in _context(record).items())
        if not context:
            return line
        first, newline, rest = line.partition("\n")  # the context ends the message line, before a traceback
        return f"{first} [{context}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, pid, message, the context fields, and exc when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def build_formatter(log_format: str = "text") -> logging.Formatter:
    """The formatter for `log_format` ("text" or "json")."""
    return JsonFormatter() if str(log_format) == "json" else ContextFormatter()


class WatibotHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, marked as ours so that configuring twice (CLI, then a worker's lifespan) adds nothing."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Send watibot's logs to stderr at `level` in `log_format` (idempotent: safe in the CLI and in each worker)."""
    logger = logging.getLogger("watibot")
    logger.setLevel(level.upper())
    # httpx logs every request URL at info; WATI's carry the reply text in the query string.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not any(isinstance(handler, WatibotHandler) for handler in logger.handlers):
        handler = WatibotHandler()
        handler.setFormatter(build_formatter(log_format))
        logger.addHandler(handler)
        logger.propagate = False


def uvicorn_log_config(level: str, log_format: str = "text") -> dict[str, Any]:
    """A `logging.dictConfig` for uvicorn, applied in every worker: its lines and ours share one format."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"watibot": {"()": "watibot.logs.build_formatter", "log_format": str(log_format)}},
        "handlers": {"stderr": {"()": "watibot.logs.WatibotHandler", "formatter": "watibot"}},
        "loggers": {
            "watibot": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            # the access log would print the webhook URL, passkey included: it stays off (access_log=False)
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "httpx": {"level": "WARNING"},
            "httpcore": {"level": "WARNING"},
        },
    }


access_log = logging.getLogger("watibot.access")


class AccessLog:
    """ASGI middleware: one info line per HTTP request, "POST /webhook 200 3.1 ms", when the app's settings turn
    it on (`WATIBOT_ACCESS_LOG`). The query string, where the webhook's passkey travels, is never printed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = getattr(getattr(scope.get("app"), "state", None), "settings", None)
        if scope["type"] != "http" or not getattr(settings, "access_log", False):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            access_log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status or 500,
                            (time.perf_counter() - started) * 1000)
