"""Real WATI accounts (issue 12): the channel each reply goes out on, WATI's V3 send API beside v1, and WATI's
`result: false` answers — against the fake WATI of tests/fakes.py, a real HTTP server."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import RunningApp, app_settings, customer_message, wait_until
from tests.fakes import Answer, FakeWati
from watibot.clients import wati_v3_host

Sql = Callable[..., list[tuple[Any, ...]]]

CUSTOMER = "50376819621"
CHANNEL_A, CHANNEL_B = "50322220000", "50322229999"


def test_each_conversation_is_answered_on_its_own_number_v1(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """One customer writing to two of our numbers gets each reply from the number it wrote to (v1
    channelPhoneNumber)."""
    app = run_app(app_settings(database_url, fake_wati))
    assert app.post(customer_message(CUSTOMER, "to A", channelPhoneNumber=CHANNEL_A)).status_code == 200
    assert app.post(customer_message(CUSTOMER, "to B", channelPhoneNumber=CHANNEL_B)).status_code == 200
    sent = fake_wati.wait_for_sent(2)
    by_channel = {message["channel"]: message for message in sent}
    assert set(by_channel) == {CHANNEL_A, CHANNEL_B}
    assert "to A" in by_channel[CHANNEL_A]["text"] and "to B" not in by_channel[CHANNEL_A]["text"]
    assert "to B" in by_channel[CHANNEL_B]["text"] and "to A" not in by_channel[CHANNEL_B]["text"]
    assert all(message["wa_id"] == CUSTOMER for message in sent)
    wait_until(lambda: sql("SELECT count(*) FROM watibot.burst WHERE status = 'sent'") == [(2,)])
    assert len(fake_wati.sent) == 2


def test_v3_sends_json_to_the_tenantless_path_naming_the_channel_and_records_wati_ids(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """With WATIBOT_WATI_API=v3 and today's URL (tenant id included), each reply is a JSON `{target, text}` to
    /api/ext/v3/…, targeted `channel:phone`, and the ids WATI returns are recorded with the burst."""
    app = run_app(app_settings(database_url, fake_wati, wati_api="v3"))
    assert app.post(customer_message(CUSTOMER, "to A", channelPhoneNumber=CHANNEL_A)).status_code == 200
    assert app.post(customer_message(CUSTOMER, "to B", channelPhoneNumber=CHANNEL_B)).status_code == 200
    sent = fake_wati.wait_for_sent(2)
    wait_until(lambda: sql("SELECT count(*) FROM watibot.burst WHERE status = 'sent'") == [(2,)])
    assert {request["path"] for request in fake_wati.requests} == {FakeWati.V3_SEND}
    assert {request["json"]["target"] for request in fake_wati.requests} == {f"{CHANNEL_A}:{CUSTOMER}",
                                                                           f"{CHANNEL_B}:{CUSTOMER}"}
    assert all(request["headers"]["authorization"] == "Bearer test-wati-token-secret"
               for request in fake_wati.requests)
    by_channel = {message["channel"]: message for message in sent}
    assert "to A" in by_channel[CHANNEL_A]["text"] and "to B" in by_channel[CHANNEL_B]["text"]
    recorded = sql("SELECT b.channel, array_agg(m.wati_message_id ORDER BY m.wati_message_id) "
                   "FROM watibot.wati_message AS m JOIN watibot.burst AS b ON b.id = m.burst_id GROUP BY b.channel")
    assert {channel: sorted(ids) for channel, ids in recorded} == {
        channel: sorted(message["ids"]) for channel, message in by_channel.items()}


def test_v3_reports_and_echoes_find_the_burst_through_the_recorded_ids(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """A V3 reply's echo is not taken for an operator's message, and its delivery reports move its burst,
    matched through the ids WATI returned (no localMessageId of ours)."""
    app = run_app(app_settings(database_url, fake_wati, wati_api="v3"))
    app.post(customer_message(CUSTOMER, "hello", channelPhoneNumber=CHANNEL_A))
    (sent,) = fake_wati.wait_for_sent(1)
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [("sent",)])
    wati_id, local_id = sent["ids"]
    echo = {"eventType": "sessionMessageSent_v2", "owner": True, "waId": CUSTOMER, "id": wati_id,
            "localMessageId": local_id, "channelPhoneNumber": CHANNEL_A, "text": sent["text"]}
    assert app.post(echo).json() == {"status": "ignored"}
    assert sql("SELECT paused_until FROM watibot.conversation") == [(None,)]
    delivered = {"eventType": "sentMessageDELIVERED_v2", "waId": CUSTOMER, "localMessageId": local_id,
                 "channelPhoneNumber": CHANNEL_A}
    assert app.post(delivered).json() == {"status": "recorded"}
    assert sql("SELECT status, delivery_status FROM watibot.burst") == [("sent", "delivered")]
    failed = {"eventType": "sessionMessageFailed", "waId": CUSTOMER, "id": wati_id, "failedCode": 131047,
              "failedDetail": "Re-engagement message"}
    assert app.post(failed).json() == {"status": "recorded"}
    assert sql("SELECT status, delivery_status FROM watibot.burst") == [("attention", "failed")]
    stranger = {**delivered, "localMessageId": "someone-elses-id"}
    assert app.post(stranger).json() == {"status": "ignored"}


@pytest.mark.parametrize(("reconcile", "status"), [(0, "attention"), (0.5, "sent")])
def test_v3_acceptance_without_a_message_id_is_an_unknown_outcome_never_resent(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql, reconcile: float,
    status: str,
) -> None:
    """A V3 2xx that names no message id may or may not have been taken: unknown, never sent again — attention
    without reconciliation, sent once WATI's history shows the message."""
    fake_wati.script.append(Answer(200, {"result": True}))
    app = run_app(app_settings(database_url, fake_wati, wati_api="v3", wati_reconcile_seconds=reconcile))
    app.post(customer_message(CUSTOMER, "hello", channelPhoneNumber=CHANNEL_A))
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [(status,)])
    if status == "attention":
        (error,) = sql("SELECT error FROM watibot.burst")[0]
        assert "without a message id" in error
    assert len(fake_wati.requests) == 1


@pytest.mark.parametrize("api", ["v1", "v3"])
def test_result_false_is_a_permanent_rejection_with_watis_reason(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql, api: str
) -> None:
    """A 2xx whose body says `"result": false` is WATI refusing the message: the burst is dead with WATI's
    `info` as the reason, and the send is not retried."""
    fake_wati.script.append(Answer(200, {"result": False, "info": "Invalid Contact Number"}))
    app = run_app(app_settings(database_url, fake_wati, wati_api=api))
    app.post(customer_message(CUSTOMER, "hello", channelPhoneNumber=CHANNEL_A))
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [("dead",)])
    (error,) = sql("SELECT error FROM watibot.burst")[0]
    assert "Invalid Contact Number" in error
    assert len(fake_wati.requests) == 1
    assert fake_wati.sent == []


def test_v3_conflict_without_a_channel_is_dead_saying_why(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """A message whose webhook named no channel, to a contact with several open conversations: WATI's 409 makes
    the burst dead with the reason (retrying cannot choose the number), after one send."""
    fake_wati.several_open.add(CUSTOMER)
    app = run_app(app_settings(database_url, fake_wati, wati_api="v3"))
    app.post(customer_message(CUSTOMER, "hello", channelPhoneNumber=None))
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [("dead",)])
    (error,) = sql("SELECT error FROM watibot.burst")[0]
    assert "409" in error and "several open conversations" in error and "no channel" in error
    assert [request["json"]["target"] for request in fake_wati.requests] == [CUSTOMER]


@pytest.mark.parametrize(
    ("api_url", "host"),
    [
        ("https://live-mt-server.wati.io/123456", "https://live-mt-server.wati.io"),
        ("https://live-mt-server.wati.io/123456/", "https://live-mt-server.wati.io"),
        ("https://live-mt-server.wati.io", "https://live-mt-server.wati.io"),
        ("https://proxy.example/wati/123456", "https://proxy.example/wati"),
    ],
)
def test_v3_host_is_derived_from_the_v1_url(api_url: str, host: str) -> None:
    """V3 paths carry no tenant id: a trailing tenant id (digits) is dropped from WATIBOT_WATI_API_URL."""
    assert wati_v3_host(api_url) == host


def test_a_v3_echo_that_beats_the_recorded_ids_is_not_taken_for_an_operator(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """WATI's echo of our V3 reply arriving while the send is still in flight (its ids not recorded yet) is
    recognised by its text and does not pause the bot; an operator's own text still does."""
    release = threading.Event()
    fake_wati.script.append(Answer(hang_until=release, body=lambda request: {"message": {"id": "w-1"}}))
    app = run_app(app_settings(database_url, fake_wati, wati_api="v3"))
    app.post(customer_message(CUSTOMER, "hello", channelPhoneNumber=CHANNEL_A))
    (arrival,) = fake_wati.wait_for(lambda arrivals: len(arrivals) == 1, arrived=True)
    echo = {"eventType": "sessionMessageSent_v2", "owner": True, "waId": CUSTOMER, "id": "not-recorded-yet",
            "channelPhoneNumber": CHANNEL_A, "text": arrival["json"]["text"]}
    try:
        assert app.post(echo).json() == {"status": "ignored"}
    finally:
        release.set()
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [("sent",)])
    assert sql("SELECT paused_until FROM watibot.conversation") == [(None,)]
    operator = {**echo, "id": "operator-1", "text": "Hi, this is Ana from the front desk"}
    assert app.post(operator).json() == {"status": "paused"}
