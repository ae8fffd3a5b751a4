"""Conversation rules around the agent: human takeover, delivery reports, superseded replies, the 24-hour
window and media descriptions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import RunningApp, app_settings, customer_message, sample, wait_until
from tests.fakes import Answer, FakeAgent, FakeWati

Sql = Callable[..., list[tuple[Any, ...]]]


def operator_message(wa_id: str, local_message_id: str | None = None) -> dict[str, Any]:
    return sample("session-message-sent", waId=wa_id, localMessageId=local_message_id)


@pytest.mark.parametrize("answered", ["skip", "process"])
def test_operator_message_pauses_the_bot_and_answered_messages_follow_the_policy(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql, answered: str
) -> None:
    """An operator's message silences the bot for the pause; afterwards what the operator answered is skipped
    (or processed, if so configured) and what came later is answered."""
    app = run_app(app_settings(database_url, fake_wati, buffer_seconds=3.0, human_pause_seconds=4.0,
                               human_answered=answered))
    assert app.post(customer_message("50376819621", "before operator")).json() == {"status": "buffered"}
    assert app.post(operator_message("50376819621")).json() == {"status": "paused"}
    paused_from = time.monotonic()
    (paused,) = sql("SELECT paused_until > now() FROM watibot.conversation")[0]
    assert paused
    assert app.post(customer_message("50376819621", "after operator")).json() == {"status": "buffered"}
    (sent,) = fake_wati.wait_for_sent(1, timeout=20)
    assert time.monotonic() - paused_from >= 3.9, "nothing was sent during the pause"
    if answered == "skip":
        assert sent["text"] == "Received 1 message:\n1. after operator"
        wait_until(lambda: sql("SELECT status, messages FROM watibot.burst ORDER BY id") == [
            ("human", 1), ("sent", 1)])
    else:
        assert sent["text"] == "Received 2 messages:\n1. before operator\n2. after operator"
    wait_until(lambda: sql("SELECT count(*) FROM watibot.message_outcome WHERE burst_id IS NULL") == [(0,)])
    assert len(fake_wati.sent) == 1


def test_our_own_reply_echoed_back_does_not_pause_the_bot(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """A sessionMessageSent carrying the localMessageId of one of our bursts is our reply, not an operator."""
    app = run_app(app_settings(database_url, fake_wati))
    app.post(customer_message("50376819621", "hello"))
    (sent,) = fake_wati.wait_for_sent(1)
    assert app.post(operator_message("50376819621", sent["local_message_id"])).json() == {"status": "ignored"}
    assert sql("SELECT paused_until FROM watibot.conversation") == [(None,)]


def test_delivery_reports_update_the_burst_and_a_failure_needs_attention(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """Delivered and read reports are recorded; a failed delivery moves the sent burst to attention, not resent."""
    app = run_app(app_settings(database_url, fake_wati))
    app.post(customer_message("50376819621", "one"))
    (first,) = fake_wati.wait_for_sent(1)
    app.post(customer_message("50376819622", "two"))
    fake_wati.wait_for_sent(2)
    second = fake_wati.sent[1]
    wait_until(lambda: sql("SELECT count(*) FROM watibot.burst WHERE status = 'sent'") == [(2,)])
    delivered = sample("sent-message-delivered-v2", localMessageId=first["local_message_id"])
    read = {**delivered, "eventType": "sentMessageREAD_v2"}
    failed = sample("session-message-failed", localMessageId=second["local_message_id"], waId="50376819622")
    assert [app.post(event).json()["status"] for event in (delivered, read, failed)] == ["recorded"] * 3
    rows = sql("SELECT status, delivery_status, delivered_at IS NOT NULL, read_at IS NOT NULL, error "
               "FROM watibot.burst ORDER BY id")
    assert rows[0] == ("sent", "read", True, True, None)
    assert rows[1][:4] == ("attention", "failed", False, False)
    assert "131047" in rows[1][4] and "24 hours" in rows[1][4]
    assert len(fake_wati.requests) == 2


def test_supersede_discards_the_unsent_reply_and_answers_the_enlarged_burst(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent, sql: Sql
) -> None:
    """With WATIBOT_SUPERSEDE, a message arriving while the agent works replaces the pending reply with one
    answer to everything."""
    release = threading.Event()
    fake_agent.script = [Answer(body=lambda request: {"reply": "stale"}, hang_until=release)]
    app = run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url, supersede=True))
    app.post(customer_message("50376819621", "one"))
    fake_agent.wait_for(lambda arrivals: len(arrivals) == 1, arrived=True)
    app.post(customer_message("50376819621", "two"))
    release.set()
    (sent,) = fake_wati.wait_for_sent(1)
    assert sent["text"] == "one | two"
    wait_until(lambda: sql("SELECT status, reply FROM watibot.burst ORDER BY id") == [
        ("superseded", "stale"), ("sent", "one | two")])
    assert len(fake_wati.requests) == 1


def test_reply_outside_the_24_hour_window_is_not_sent(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """A burst whose newest customer message is older than 24 hours is closed as expired, with no free-form send."""
    app = run_app(app_settings(database_url, fake_wati))
    day_ago = int(time.time()) - 25 * 3600
    app.post(customer_message("50376819621", "late delivery", timestamp=str(day_ago)))
    (row,) = wait_until(lambda: sql("SELECT status, error FROM watibot.burst WHERE status = 'expired'"))
    assert "24-hour session window" in row[1]
    assert fake_wati.requests == []
    assert sql("SELECT template FROM watibot.burst") == [(None,)]


@pytest.mark.parametrize("api", ["v1", "v3"])
def test_outside_the_window_the_configured_template_is_sent_instead_and_recorded(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql, api: str
) -> None:
    """With WATIBOT_WINDOW_TEMPLATE set, a burst outside the 24-hour window gets that template (its parameters, on
    the conversation's number) and no free-form reply, and the burst records it as sent."""
    app = run_app(app_settings(database_url, fake_wati, wati_api=api, window_template="reopen_chat",
                               window_template_parameters={"name": "customer", "shop": "Tienda"}))
    day_ago = int(time.time()) - 25 * 3600
    app.post(customer_message("50376819621", "late delivery", timestamp=str(day_ago),
                              channelPhoneNumber="50322220000"))
    (row,) = wait_until(lambda: sql("SELECT status, template, parts_sent, reply, error FROM watibot.burst "
                                    "WHERE status NOT IN ('processing', 'sending', 'retry')"))
    assert row[:3] == ("sent", "reopen_chat", 1) and row[4] is None
    assert "late delivery" in row[3], "the agent's reply is kept for the record"
    (sent,) = fake_wati.sent
    assert (sent["template"], sent["wa_id"], sent["channel"], sent["text"]) == (
        "reopen_chat", "50376819621", "50322220000", None)
    assert sent["parameters"] == [{"name": "name", "value": "customer"}, {"name": "shop", "value": "Tienda"}]
    assert sent["broadcast_name"].startswith("watibot-window-")
    assert [request["path"] for request in fake_wati.requests] == [
        FakeWati.V1_TEMPLATE if api == "v1" else FakeWati.V3_TEMPLATE]


def test_inside_the_window_the_template_setting_changes_nothing(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """With WATIBOT_WINDOW_TEMPLATE set, a customer inside the window gets the agent's reply, not the template."""
    app = run_app(app_settings(database_url, fake_wati, window_template="reopen_chat"))
    app.post(customer_message("50376819621", "hello"))
    (sent,) = fake_wati.wait_for_sent(1)
    assert "hello" in sent["text"] and "template" not in sent
    wait_until(lambda: sql("SELECT 1 FROM watibot.burst WHERE status = 'sent'"))
    assert sql("SELECT template, parts_sent FROM watibot.burst") == [(None, 1)]


def test_a_template_send_with_an_unknown_outcome_needs_attention_and_is_not_sent_again(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """A template send whose connection drops is an unknown outcome: attention, one request, no reply sent."""
    fake_wati.script.append(Answer(drop=True, record=True))
    app = run_app(app_settings(database_url, fake_wati, window_template="reopen_chat"))
    app.post(customer_message("50376819621", "late", timestamp=str(int(time.time()) - 25 * 3600)))
    (row,) = wait_until(lambda: sql("SELECT status, template, error FROM watibot.burst "
                                    "WHERE status NOT IN ('processing', 'sending', 'retry')"))
    assert row[:2] == ("attention", "reopen_chat") and "outcome unknown" in row[2]
    assert len(fake_wati.requests) == 1 and fake_wati.history_requests == []


def test_media_resolver_describes_non_text_messages(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent
) -> None:
    """With WATIBOT_MEDIA_RESOLVER set, non-text messages reach the agent as the resolver describes them."""
    app = run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url,
                               media_resolver="tests.media_resolver:resolve"))
    app.post(sample("message-image", timestamp=str(int(time.time()))))
    fake_wati.wait_for_sent(1)
    assert fake_agent.requests[0]["json"]["prompt"] == (
        "<image at data/images/3f1c2a9e-7b1d-4c55-9d0e-2a6b8e4f1c11.jpg showing a double room> "
        "¿Esta es la habitación doble?")



@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"waId": "50376819699"}, "another customer's number"),
        ({"waId": None}, "no customer at all"),
        ({"channelPhoneNumber": "50399999999"}, "another channel"),
        ({"waId": "50376819699", "channelPhoneNumber": None}, "another customer, no channel"),
    ],
)
def test_a_delivery_report_naming_another_customer_moves_nothing(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql,
    changes: dict[str, Any], why: str,
) -> None:
    """A failure report carrying one of our localMessageIds but naming another customer (or none, or another
    channel) is answered `ignored` and leaves the burst sent; the right customer's report moves it."""
    app = run_app(app_settings(database_url, fake_wati))
    app.post(customer_message("50376819621", "one"))
    (sent,) = fake_wati.wait_for_sent(1)
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [("sent",)])
    forged = sample("session-message-failed", localMessageId=sent["local_message_id"], waId="50376819621",
                    channelPhoneNumber="50322220000")
    forged.update(changes)
    forged = {key: value for key, value in forged.items() if value is not None}
    assert app.post(forged).json() == {"status": "ignored"}, why
    assert sql("SELECT status, delivery_status FROM watibot.burst") == [("sent", None)]
    genuine = sample("session-message-failed", localMessageId=sent["local_message_id"], waId="50376819621",
                     channelPhoneNumber="50322220000")
    assert app.post(genuine).json() == {"status": "recorded"}
    assert sql("SELECT status, delivery_status FROM watibot.burst") == [("attention", "failed")]
