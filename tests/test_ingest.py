"""POST /webhook: what is stored, what is answered, and that nothing is stored for a refused request."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import PASSKEY, RunningApp, app_settings, customer_message, sample, wait_until
from tests.netfaults import TcpProxy

Sql = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture
def app(run_app: Callable[..., RunningApp], database_url: str) -> RunningApp:
    """The app with its sweeper off, so stored rows stay as ingest left them."""
    return run_app(app_settings(database_url, sweeper=False, buffer_seconds=60))


def count_messages(sql: Sql) -> int:
    return int(sql("SELECT count(*) FROM watibot.message")[0][0])


def test_customer_message_is_buffered_and_schedules_its_conversation(app: RunningApp, sql: Sql) -> None:
    """A customer message is stored with its fields and raw payload, and its conversation becomes due."""
    payload = sample("message-text")
    response = app.post(payload)
    assert response.status_code == 200
    assert response.json() == {"status": "buffered"}
    rows = sql("SELECT channel, customer, provider_message_id, wati_id, type, text, "
               "extract(epoch from wati_timestamp)::bigint, payload, position FROM watibot.message")
    assert rows == [("50322220000", "50376819621", payload["whatsappMessageId"], payload["id"], "text",
                     payload["text"], 1762478993, payload, 1)]
    assert sql("SELECT last_position, answered_position FROM watibot.conversation") == [(1, 0)]
    (due_in,) = sql("SELECT extract(epoch from due_at - buffer_started_at) FROM watibot.conversation")[0]
    assert float(due_in) == pytest.approx(60, abs=0.01)


def test_repeated_delivery_is_stored_once(app: RunningApp, sql: Sql) -> None:
    """The same whatsappMessageId delivered twice is stored once and answered 'duplicate'."""
    payload = sample("message-text")
    assert app.post(payload).json() == {"status": "buffered"}
    assert app.post(payload).json() == {"status": "duplicate"}
    assert count_messages(sql) == 1


def test_concurrent_duplicate_deliveries_are_stored_once(app: RunningApp, sql: Sql) -> None:
    """Twenty concurrent deliveries of one message: one 'buffered', the rest 'duplicate', one row."""
    payload = customer_message("50370000001", "hola")
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda _: httpx.post(f"{app.url}/webhook", params={"passkey": PASSKEY},
                                                      json=payload, timeout=10).json()["status"], range(20)))
    assert sorted(statuses) == ["buffered"] + ["duplicate"] * 19
    assert count_messages(sql) == 1


def test_message_id_falls_back_to_wati_id(app: RunningApp, sql: Sql) -> None:
    """Without whatsappMessageId the WATI record id identifies the message."""
    payload = sample("message-text", whatsappMessageId="")
    assert app.post(payload).json() == {"status": "buffered"}
    assert sql("SELECT provider_message_id FROM watibot.message") == [(payload["id"],)]


def test_bsuid_is_the_customer_key_when_present(app: RunningApp, sql: Sql) -> None:
    """A message_bsuid event without waId is keyed by its bsuid."""
    assert app.post(sample("message-bsuid")).json() == {"status": "buffered"}
    assert sql("SELECT customer, wa_id FROM watibot.conversation") == [("CO.1234567890123456", None)]


@pytest.mark.parametrize("name", ["new-contact", "sent-message-delivered-v2", "session-message-failed"])
def test_other_events_are_acknowledged_not_buffered(app: RunningApp, sql: Sql, name: str) -> None:
    """New contacts and status events about messages that are not ours get 200 'ignored' and store nothing."""
    response = app.post(sample(name))
    assert (response.status_code, response.json()) == (200, {"status": "ignored"})
    assert count_messages(sql) == 0


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("query", 200), ("header", 200), ("body", 200),
        ("wrong-query", 401), ("wrong-header", 401), ("wrong-body", 401), ("none", 401),
    ],
)
def test_passkey_forms(app: RunningApp, sql: Sql, how: str, expected: int) -> None:
    """The passkey is accepted from the query, a header or the body; anything else is 401 and stores nothing."""
    payload = sample("message-text")
    params: dict[str, str] = {}
    headers: dict[str, str] = {}
    if how == "query":
        params["passkey"] = PASSKEY
    elif how == "header":
        headers["X-Watibot-Passkey"] = PASSKEY
    elif how == "body":
        payload["passkey"] = PASSKEY
    elif how == "wrong-query":
        params["passkey"] = PASSKEY + "x"
    elif how == "wrong-header":
        headers["X-Watibot-Passkey"] = "nope"
    elif how == "wrong-body":
        payload["passkey"] = "nope"
    response = app.client.post("/webhook", json=payload, params=params, headers=headers)
    assert response.status_code == expected
    assert count_messages(sql) == (1 if expected == 200 else 0)
    if expected == 401:
        assert response.json() == {"detail": "missing or wrong passkey"}
    else:
        stored = sql("SELECT payload FROM watibot.message")[0][0]
        assert "passkey" not in stored


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"{not json", "body is not valid JSON"),
        (b"[1, 2]", "body must be a JSON object, not list"),
        (json.dumps({"eventType": "message", "waId": "50376819621", "text": "hi"}).encode(),
         "missing field 'whatsappMessageId'"),
        (json.dumps({**sample("message-text"), "waId": None}).encode(), "missing field 'waId'"),
        (json.dumps({**sample("message-text"), "waId": "abc123"}).encode(), "field 'waId' must be"),
        (json.dumps({**sample("message-text"), "timestamp": "yesterday"}).encode(), "field 'timestamp'"),
        (json.dumps({"text": "hi"}).encode(), "missing field 'eventType'"),
    ],
)
def test_unusable_bodies_are_422_and_store_nothing(app: RunningApp, sql: Sql, body: bytes, detail: str) -> None:
    """Malformed JSON or missing fields: 422 with a message saying what is wrong; nothing stored."""
    response = app.client.post("/webhook", content=body, params={"passkey": PASSKEY},
                               headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert detail in response.json()["detail"]
    assert count_messages(sql) == 0


def test_oversized_body_is_413(app: RunningApp, sql: Sql) -> None:
    """A body over the limit is refused with 413, whether declared by Content-Length or streamed chunked."""
    payload = customer_message("50370000002", "x" * (300 * 1024))
    response = app.post(payload)
    assert response.status_code == 413
    body = json.dumps(payload).encode()

    def chunks() -> Any:
        for start in range(0, len(body), 16 * 1024):
            yield body[start:start + 16 * 1024]

    response = app.client.post("/webhook", content=chunks(), params={"passkey": PASSKEY},
                               headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert count_messages(sql) == 0


def test_wrong_content_type_is_415_unless_the_body_is_json(app: RunningApp, sql: Sql) -> None:
    """A non-JSON body declared as something else is refused with 415; a JSON body is taken whatever its type."""
    response = app.client.post("/webhook", content="waId=50376819621&text=hi", params={"passkey": PASSKEY},
                               headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415
    assert count_messages(sql) == 0
    response = app.client.post("/webhook", content=json.dumps(sample("message-text")), params={"passkey": PASSKEY},
                               headers={"content-type": "text/plain"})
    assert response.json() == {"status": "buffered"}
    assert count_messages(sql) == 1


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
def test_database_down_is_503_in_bounded_time(run_app: Callable[..., RunningApp], database_url: str,
                                              sql: Sql, mode: str) -> None:
    """With the database gone (refusing or silent) the webhook answers 503 in bounded time, never 200; WATI's retry
    of the refused message is stored exactly once, even when the blackholed first try reached the server later."""
    proxy = TcpProxy(urlsplit(database_url).port or 5432).start()
    try:
        app = run_app(app_settings(proxy.url(database_url), sweeper=False, db_timeout_seconds=1.0))
        assert app.post(customer_message("50370000003", "before")).status_code == 200
        proxy.reset() if mode == "reset" else proxy.blackhole()
        during = customer_message("50370000003", "during")
        response = app.post(during)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert "not known to be" in response.json()["detail"]
        assert response.elapsed.total_seconds() < 3.0
        proxy.heal()
        assert wait_until(lambda: app.post(customer_message("50370000003", "after")).status_code == 200,
                          timeout=10, what="ingest to recover")
        retried = app.post(during)  # WATI retries the refused delivery
        assert retried.status_code == 200
        assert retried.json()["status"] in {"buffered", "duplicate"}
    finally:
        proxy.stop()
    assert sorted(sql("SELECT text FROM watibot.message")) == [("after",), ("before",), ("during",)]


def test_a_trailing_slash_is_a_404_never_a_redirect_carrying_the_passkey(app: RunningApp, sql: Sql) -> None:
    """`POST /webhook/?passkey=…` is answered 404 with no Location header; nothing is stored."""
    response = app.client.post("/webhook/", json=sample("message-text"), params={"passkey": PASSKEY},
                               follow_redirects=False)
    assert response.status_code == 404
    assert "location" not in response.headers
    assert count_messages(sql) == 0
