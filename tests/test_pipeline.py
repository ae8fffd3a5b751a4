"""Bursts end to end in one process: webhook in, agent, WATI out — with fakes as real HTTP servers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from tests.conftest import RunningApp, app_settings, customer_message, wait_until
from tests.fakes import Answer, FakeAgent, FakeWati

Sql = Callable[..., list[tuple[Any, ...]]]


def test_two_messages_a_second_apart_get_one_reply_with_both(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati
) -> None:
    """The old system's own check: two messages from one customer inside the window → one reply with both."""
    app = run_app(app_settings(database_url, fake_wati, buffer_seconds=4.0))  # room for a stalled machine
    assert app.post(customer_message("50376819621", "hi")).json() == {"status": "buffered"}
    time.sleep(0.5)  # the customer typing, not synchronisation
    assert app.post(customer_message("50376819621", "I want to book")).json() == {"status": "buffered"}
    (sent,) = fake_wati.wait_for_sent(1)
    assert sent["wa_id"] == "50376819621"
    assert sent["text"] == "Received 2 messages:\n1. hi\n2. I want to book"
    assert fake_wati.requests[0]["headers"]["authorization"] == "Bearer test-wati-token-secret"
    assert fake_wati.requests[0]["path"] == "/1234/api/v1/sendSessionMessage/50376819621"


def test_four_customers_at_once_get_four_replies(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """Four customers writing at the same time get one reply each, and no reply twice."""
    app = run_app(app_settings(database_url, fake_wati))
    customers = [f"5037000000{number}" for number in range(4)]
    for wa_id in customers:
        app.post(customer_message(wa_id, f"hello from {wa_id}"))
    sent = fake_wati.wait_for_sent(4)
    assert sorted(message["wa_id"] for message in sent) == customers
    wait_until(lambda: sql("SELECT count(*) FROM watibot.burst WHERE status = 'sent'") == [(4,)])
    assert len(fake_wati.sent) == 4
    local_ids = sql("SELECT id::text FROM watibot.burst ORDER BY id")
    assert sorted(message["local_message_id"] for message in sent) == sorted(row[0] for row in local_ids)


def test_http_agent_gets_every_message_of_the_burst_in_order(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent
) -> None:
    """The HTTP agent receives the documented JSON with the burst's messages in WATI timestamp order."""
    # Posted to a worker without a sweeper, answered by one started afterwards: one burst, whatever the timing.
    app = run_app(app_settings(database_url, fake_wati, sweeper=False))
    now = int(time.time())
    # Delivered out of order: the later-typed message arrives first.
    app.post(customer_message("50376819621", "second", timestamp=str(now + 1), message_id="wamid.B"))
    app.post(customer_message("50376819621", "first", timestamp=str(now), message_id="wamid.A"))
    app.post(customer_message("50376819621", "caption", message_id="wamid.C", type="image",
                              data="data/images/x.jpg", timestamp=str(now + 2)))
    run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url))
    (sent,) = fake_wati.wait_for_sent(1)
    (request,) = fake_agent.requests
    body = request["json"]
    assert body["wa_id"] == "50376819621"
    assert body["conversation"] == "50322220000/50376819621"
    assert [m["whatsapp_message_id"] for m in body["messages"]] == ["wamid.A", "wamid.B", "wamid.C"]
    assert [m["type"] for m in body["messages"]] == ["text", "text", "image"]
    assert set(body["messages"][0]) == {"id", "whatsapp_message_id", "type", "text", "timestamp"}
    assert body["prompt"] == "first\nsecond\n[image: data/images/x.jpg] caption"
    assert sent["text"] == "first | second | caption"


def test_agent_null_reply_sends_nothing(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent, sql: Sql
) -> None:
    """{"reply": null} closes the burst as no_reply without calling WATI."""
    fake_agent.default = lambda request: Answer(body={"reply": None})
    app = run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url))
    app.post(customer_message("50376819621", "ok thanks"))
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [("no_reply",)])
    assert fake_wati.requests == []
    assert sql("SELECT count(*) FROM watibot.message_outcome WHERE burst_id IS NULL") == [(0,)]


def test_message_arriving_during_processing_lands_in_the_next_burst(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent, sql: Sql
) -> None:
    """A message that arrives while its conversation's burst is with the agent forms the next burst."""
    release = threading.Event()
    fake_agent.script = [Answer(body={"reply": "answer one"}, hang_until=release)]
    app = run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url))
    app.post(customer_message("50376819621", "one"))
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [("processing",)], what="burst with the agent")
    app.post(customer_message("50376819621", "two"))
    release.set()
    sent = fake_wati.wait_for_sent(2)
    assert [message["text"] for message in sent] == ["answer one", "two"]
    assert [request["json"]["prompt"] for request in fake_agent.requests] == ["one", "two"]


def test_wati_errors_are_retried_with_backoff_then_sent_once(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent, sql: Sql
) -> None:
    """500 and 429 (with Retry-After) from WATI are retried; the agent is asked once; one reply goes out."""
    fake_wati.script = [Answer(status=500), Answer(status=429, headers={"Retry-After": "1"})]
    app = run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url))
    app.post(customer_message("50376819621", "hello"))
    fake_wati.wait_for_sent(1)
    statuses = [request["status"] for request in fake_wati.requests]
    assert statuses == [500, 429, 200]
    gap = fake_wati.requests[2]["received"] - fake_wati.requests[1]["received"]
    assert gap >= 0.95, "Retry-After: 1 must be honoured"
    assert len(fake_agent.requests) == 1, "a recorded reply is resent, not regenerated"
    wait_until(lambda: sql("SELECT status, attempts FROM watibot.burst") == [("sent", 3)])


def test_permanent_wati_error_marks_the_burst_dead_with_the_reason(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """A 401 from WATI cannot be fixed by retrying: the burst is dead, saying why, and its messages leave the buffer."""
    fake_wati.default = lambda request: Answer(status=401, body={"error": "bad token"})
    app = run_app(app_settings(database_url, fake_wati))
    app.post(customer_message("50376819621", "hello"))
    (row,) = wait_until(lambda: sql("SELECT status, error FROM watibot.burst WHERE status = 'dead'"))
    assert "HTTP 401" in row[1]
    assert len(fake_wati.requests) == 1
    assert sql("SELECT count(*) FROM watibot.message_outcome WHERE burst_id IS NULL") == [(0,)]


def test_failing_agent_is_retried_up_to_max_attempts_then_dead(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent, sql: Sql
) -> None:
    """An agent answering 503 is retried MAX_ATTEMPTS times in all, then the burst is dead."""
    fake_agent.default = lambda request: Answer(status=503)
    app = run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url, max_attempts=3))
    app.post(customer_message("50376819621", "hello"))
    (row,) = wait_until(lambda: sql("SELECT attempts, error FROM watibot.burst WHERE status = 'dead'"))
    assert row[0] == 3
    assert "gave up after 3 attempts" in row[1]
    assert len(fake_agent.requests) == 3
    assert fake_wati.requests == []


def test_send_with_unknown_outcome_is_not_resent(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """WATI answering after the send timeout, reconciliation off: the outcome is unknown, so the burst goes to
    attention, sent once (tests/test_reconciliation.py covers the history lookup)."""
    release = threading.Event()
    fake_wati.script = [Answer(hang_until=release)]
    app = run_app(app_settings(database_url, fake_wati, wati_timeout_seconds=0.5, wati_reconcile_seconds=0))
    app.post(customer_message("50376819621", "hello"))
    try:
        (row,) = wait_until(lambda: sql("SELECT status, error FROM watibot.burst WHERE status = 'attention'"))
    finally:
        release.set()
    assert "outcome unknown" in row[1]
    fake_wati.wait_for(lambda requests: len(requests) == 1)
    app.post(customer_message("50376819621", "still there?"))
    fake_wati.wait_for_sent(2)
    assert len(fake_wati.requests) == 2, "the unknown send was not repeated"


def test_long_reply_is_split_into_ordered_parts(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent, sql: Sql
) -> None:
    """A reply over 4096 characters goes out as several messages, in order, with numbered localMessageIds."""
    long_reply = " ".join(f"word{number}" for number in range(1500))
    fake_agent.default = lambda request: Answer(body={"reply": long_reply})
    app = run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url))
    app.post(customer_message("50376819621", "tell me everything"))
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [("sent",)])
    sent = fake_wati.sent
    assert len(sent) >= 3
    assert all(len(message["text"]) <= 4096 for message in sent)
    assert " ".join(message["text"] for message in sent) == long_reply
    (burst_id,) = sql("SELECT id FROM watibot.burst")[0]
    assert [message["local_message_id"] for message in sent] == [f"{burst_id}.{n}" for n in range(1, len(sent) + 1)]


def test_slow_agent_keeps_its_lease_by_heartbeat(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent, sql: Sql
) -> None:
    """An agent slower than the lease: the heartbeat extends it, no takeover happens, one reply goes out."""
    # An agent at 2x the lease; a 6 s lease beats every 2 s (lease / 3), so a 1-2 s stall of this loaded
    # interpreter (two apps and the fakes) cannot cost it the lease.
    fake_agent.script = [Answer(body={"reply": "slow answer"}, delay=12.0)]
    settings = app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url, lease_seconds=6.0,
                            wati_timeout_seconds=2.0, agent_timeout_seconds=20)
    run_app(settings)
    second = run_app(settings)  # a second worker that would take over an expired lease
    second.post(customer_message("50376819621", "hello"))
    fake_wati.wait_for_sent(1)
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [("sent",)])
    assert sql("SELECT fence, attempts FROM watibot.burst") == [(1, 1)]
    assert len(fake_agent.requests) == 1
