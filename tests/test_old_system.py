"""The old system's own checks, run as its document wrote them (curl, passkey in the body), against `watibot serve`."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import PASSKEY, ServeProcess, serve_environment, wait_until
from tests.fakes import FakeWati

Sql = Callable[..., list[tuple[Any, ...]]]

pytestmark = pytest.mark.processes


def curl(url: str, body: dict[str, str], content_type: bool = True) -> dict[str, Any]:
    """`curl -X POST URL [-H 'Content-Type: application/json'] -d BODY`, as the old document runs it."""
    command = ["curl", "-sS", "-X", "POST", f"{url}/webhook", "-d", json.dumps(body), "-w", "\n%{http_code}"]
    if content_type:
        command[4:4] = ["-H", "Content-Type: application/json"]
    output = subprocess.run(command, check=True, capture_output=True, text=True, timeout=30).stdout
    text, _, status = output.rpartition("\n")
    return {"status": int(status), "body": json.loads(text)}


def settled(sql: Sql) -> bool:
    """Nothing buffered, due or in flight any more."""
    ((buffered, in_flight, overdue, buffering),) = sql(
        "SELECT buffered_messages, in_flight, overdue, buffering FROM watibot.health")
    return buffered == in_flight == overdue == buffering == 0


def test_the_old_documents_three_checks_pass_as_written(
    serve: Callable[..., ServeProcess], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """One message → one reply; two rapid messages → one combined reply; four customers at once with no
    Content-Type → four replies; no customer answered twice, and the opt-in access log shows the webhooks."""
    process = serve(serve_environment(database_url, fake_wati, WATIBOT_BUFFER_SECONDS="3",
                                      WATIBOT_ACCESS_LOG="true"), workers=2)
    customer = "50376819621"

    # Check 1: one message, passkey in the body.
    assert curl(process.url, {"waId": customer, "text": "Message 1", "passkey": PASSKEY}) == {
        "status": 200, "body": {"status": "buffered"}}
    (first,) = fake_wati.wait_for_sent(1)
    assert first["wa_id"] == customer
    assert "Message 1" in first["text"]

    # Check 2: two messages in quick succession are answered once, together.
    for text in ("Message 2", "Message 3"):
        assert curl(process.url, {"waId": customer, "text": text, "passkey": PASSKEY})["status"] == 200
    second = fake_wati.wait_for_sent(2)[1]
    assert second["wa_id"] == customer
    assert "Message 2" in second["text"] and "Message 3" in second["text"]

    # Check 3: four customers at once, no Content-Type header (curl then sends form-encoded).
    others = [f"5037681963{n}" for n in range(4)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(
            lambda wa_id: curl(process.url, {"waId": wa_id, "text": f"Hello from {wa_id}", "passkey": PASSKEY},
                               content_type=False), others))
    assert [answer["status"] for answer in answers] == [200] * 4
    fake_wati.wait_for_sent(6, timeout=60)
    wait_until(lambda: settled(sql), timeout=60, what="every burst finished")
    sent = fake_wati.sent
    assert len(sent) == 6, "no customer is answered twice"
    for wa_id in others:
        (reply,) = [message for message in sent if message["wa_id"] == wa_id]
        assert f"Hello from {wa_id}" in reply["text"]
    assert sql("SELECT status, count(*) FROM watibot.burst GROUP BY status") == [("sent", 6)]

    # The passkey may travel in the query string too; the access log leaves it out.
    report = {"eventType": "sentMessageREAD", "waId": customer}
    assert httpx.post(f"{process.url}/webhook", params={"passkey": PASSKEY}, json=report).status_code == 200
    process.stop()
    log = process.log_path.read_text()
    access = [line for line in log.splitlines() if "watibot.access" in line]
    assert sum("POST /webhook 200 " in line for line in access) == 8
    assert PASSKEY not in log, "the access log never prints the query string or the body"
