"""Logs of a real `watibot serve`: JSON lines or text, ids on processing lines, never a secret or a message text."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import PASSKEY, ServeProcess, customer_message, serve_environment
from tests.fakes import FakeWati

pytestmark = pytest.mark.processes

WATI_TOKEN = "test-wati-token-secret"  # the fake token serve_environment configures
WRONG_PASSKEY = "an-attacker-guess-0123456789"
BODY = "my card number is 4111 1111 1111 1111"


def exercise(process: ServeProcess, fake_wati: FakeWati) -> int:
    """Send a message that gets answered, a duplicate, a wrong passkey and an ignored event; returns how many."""
    message = customer_message("50376819621", BODY)
    assert httpx.post(f"{process.url}/webhook", params={"passkey": PASSKEY}, json=message).status_code == 200
    assert httpx.post(f"{process.url}/webhook", headers={"X-Watibot-Passkey": PASSKEY}, json=message).json() == {
        "status": "duplicate"}
    assert httpx.post(f"{process.url}/webhook", params={"passkey": WRONG_PASSKEY}, json=message).status_code == 401
    assert httpx.post(f"{process.url}/webhook", json={**message, "passkey": PASSKEY, "eventType": "sentMessageREAD"}
                      ).json() == {"status": "ignored"}
    fake_wati.wait_for_sent(1)
    return 4


def test_json_logs_are_one_object_per_line_with_ids_and_no_secrets_or_texts(
    serve: Callable[..., ServeProcess], database_url: str, fake_wati: FakeWati
) -> None:
    """With WATIBOT_LOG_FORMAT=json every line of a 2-worker serve is JSON; bursts name their ids; nothing leaks."""
    process = serve(serve_environment(database_url, fake_wati, WATIBOT_LOG_FORMAT="json"), workers=2)
    exercise(process, fake_wati)
    process.stop()
    lines = [line for line in process.log_path.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    assert all({"ts", "level", "logger", "pid", "message"} <= entry.keys() for entry in entries)
    assert any(entry["logger"].startswith("uvicorn") for entry in entries), "uvicorn's own lines are JSON too"
    (sent,) = [entry for entry in entries if entry["message"].startswith("burst sent")]
    assert sent["conversation"].endswith("/50376819621")
    assert isinstance(sent["burst"], int) and isinstance(sent["fence"], int)
    assert sent["worker"].split(":")[1] == str(sent["pid"])
    text = process.log_path.read_text()
    for secret in (PASSKEY, WRONG_PASSKEY, WATI_TOKEN, "4111"):
        assert secret not in text


def test_debug_text_logs_have_one_line_per_webhook_and_still_no_secrets(
    serve: Callable[..., ServeProcess], database_url: str, fake_wati: FakeWati
) -> None:
    """At debug level each webhook gets one readable line; secrets stay out even there."""
    process = serve(serve_environment(database_url, fake_wati, WATIBOT_LOG_LEVEL="debug"), workers=1)
    sent = exercise(process, fake_wati)
    process.stop()
    text = process.log_path.read_text()
    webhook_lines = [line for line in text.splitlines() if "watibot.ingest[" in line]
    assert len(webhook_lines) == sent, webhook_lines
    assert any("buffered wamid." in line for line in webhook_lines)
    assert any("webhook answered 401 unauthorized" in line for line in webhook_lines)
    assert "burst sent (1 messages, 1 parts) [conversation=" in text
    assert " worker=" in text
    for secret in (PASSKEY, WRONG_PASSKEY, WATI_TOKEN):
        assert secret not in text


def test_text_log_lines_cannot_be_forged_or_colour_the_terminal() -> None:
    """A newline, carriage return or ESC sequence in a message or a context field stays on its one line, spelled
    out; a traceback still follows on its own lines."""
    import logging

    from watibot.logs import build_formatter

    formatter = build_formatter("text")
    record = logging.LogRecord("watibot.ingest", logging.WARNING, __file__, 1, "buffered %s",
                               ("wamid.1\n2026-12-01 00:00:00 ERROR forged line\r\x1b[31m",), None)
    record.conversation = "50322220000/bsuid\nforged=1"
    line = formatter.format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "wamid.1\\n2026-12-01 00:00:00 ERROR forged line\\r\\x1b[31m" in line
    assert "[conversation=50322220000/bsuid\\nforged=1" in line
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        failing = logging.LogRecord("watibot.loops", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    failing.conversation = "c/1"
    text = formatter.format(failing)
    first, _, traceback = text.partition("\n")
    assert "failed [conversation=c/1" in first
    assert traceback.startswith("Traceback") and "RuntimeError: boom" in traceback
