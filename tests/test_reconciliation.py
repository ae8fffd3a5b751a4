"""Check before paging (issue 12): a send whose outcome is unknown is looked up in WATI's message history before
anyone is paged or anything is sent again — against the fake WATI, which keeps a history and can record a message
and then drop the connection, or answer a gateway's 502/504 after recording it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from tests.conftest import RunningApp, app_settings, customer_message, wait_until
from tests.fakes import Answer, FakeWati
from tests.test_claim import make_due, run
from watibot.store import Stores
from watibot.store.records import Burst, RecordedReply

Sql = Callable[..., list[tuple[Any, ...]]]

CUSTOMER, CHANNEL = "50376819621", "50322220000"
GATEWAY_PAGE = b"<html><body><h1>502 Bad Gateway</h1></body></html>"


def start(run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, api: str = "v1",
          **overrides: Any) -> RunningApp:
    """An app whose reconciliation waits half a second before deciding a message is absent."""
    app = run_app(app_settings(database_url, fake_wati, wati_api=api, wati_reconcile_seconds=0.5, **overrides))
    assert app.post(customer_message(CUSTOMER, "hello", channelPhoneNumber=CHANNEL)).status_code == 200
    return app


def final_status(sql: Sql) -> str:
    """The burst's status once it has left the open statuses."""
    (status,) = wait_until(lambda: sql("SELECT status FROM watibot.burst WHERE status NOT IN "
                                       "('processing', 'sending', 'retry')"), what="the burst closed")[0]
    return str(status)


@pytest.mark.parametrize(
    ("api", "answer"),
    [
        ("v1", Answer(drop=True, record=True)),
        ("v1", Answer(502, raw=GATEWAY_PAGE, record=True)),
        ("v3", Answer(504, raw=GATEWAY_PAGE, record=True)),
        ("v3", Answer(drop=True, record=True)),
    ],
    ids=["v1-accepted-then-dropped", "v1-gateway-502-after-recording", "v3-gateway-504-after-recording",
         "v3-accepted-then-dropped"],
)
def test_an_unknown_send_found_in_watis_history_is_recorded_as_sent_once(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql, api: str, answer: Answer
) -> None:
    """WATI recorded the message but the answer was lost or a gateway's: the history shows it, so the burst is
    sent — one send, no second reply, nobody paged."""
    fake_wati.script.append(answer)
    start(run_app, database_url, fake_wati, api)
    assert final_status(sql) == "sent"
    assert len(fake_wati.requests) == 1, "never sent twice"
    assert len(fake_wati.sent) == 1
    assert fake_wati.history_requests
    if api == "v3":  # the ids found in the history are recorded, so reports find the burst
        (entry,) = fake_wati.history[CUSTOMER]
        assert sql("SELECT wati_message_id FROM watibot.wati_message ORDER BY 1") == sorted(
            [(entry["id"],), (entry["local_message_id"],)])


@pytest.mark.parametrize("api", ["v1", "v3"])
def test_an_unknown_send_absent_from_watis_history_is_sent_once_more(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql, api: str
) -> None:
    """The connection dropped before WATI recorded the message: still absent after the grace period, it is sent
    once more, and the customer gets exactly one reply."""
    fake_wati.script.append(Answer(drop=True, record=False))
    start(run_app, database_url, fake_wati, api)
    assert final_status(sql) == "sent"
    assert len(fake_wati.requests) == 2
    assert len(fake_wati.sent) == 1 and len(fake_wati.history[CUSTOMER]) == 1
    assert len(fake_wati.history_requests) >= 2, "looked again after the grace period before resending"
    gap = fake_wati.requests[1]["received"] - fake_wati.requests[0]["received"]
    assert gap >= 0.5


def test_an_unknown_send_stays_unknown_when_the_history_is_unavailable(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """WATI's history cannot be read: the outcome stays unknown, the burst needs attention, nothing is resent."""
    fake_wati.script.append(Answer(drop=True, record=False))
    fake_wati.history_status = 500
    start(run_app, database_url, fake_wati)
    assert final_status(sql) == "attention"
    (error,) = sql("SELECT error FROM watibot.burst")[0]
    assert "outcome unknown" in error and "history answered HTTP 500" in error
    assert len(fake_wati.requests) == 1


def test_a_second_unknown_send_that_is_absent_is_not_sent_a_third_time(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """Two unknown sends, both absent from the history: attention after the second, never a third send."""
    fake_wati.script.extend([Answer(drop=True, record=False), Answer(drop=True, record=False)])
    start(run_app, database_url, fake_wati)
    assert final_status(sql) == "attention"
    assert len(fake_wati.requests) == 2


def test_a_5xx_with_watis_own_error_body_is_still_a_retried_rejection(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """A 502 carrying WATI's JSON error is WATI saying no: retried with backoff, without a history lookup."""
    fake_wati.script.append(Answer(502, {"result": False, "info": "upstream busy"}))
    start(run_app, database_url, fake_wati)
    assert final_status(sql) == "sent"
    assert [request["status"] for request in fake_wati.requests] == [502, 200]
    assert fake_wati.history_requests == []


def test_reconciliation_off_pages_as_before(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """WATIBOT_WATI_RECONCILE_SECONDS=0: an unknown send goes straight to attention, no history lookup."""
    fake_wati.script.append(Answer(drop=True, record=True))
    app = run_app(app_settings(database_url, fake_wati, wati_reconcile_seconds=0))
    app.post(customer_message(CUSTOMER, "hello", channelPhoneNumber=CHANNEL))
    assert final_status(sql) == "attention"
    assert fake_wati.history_requests == []


def test_a_resend_is_allowed_only_to_the_holder_with_the_part_still_marked(database_url: str, sql: Sql) -> None:
    """The check before a resend gives the lease left to the worker that holds the claim with the part marked,
    and nothing once the claim moved on (another fence) or the mark was cleared."""
    make_due(sql, 1)

    async def scenario(stores: Stores) -> list[float | None]:
        (claim,) = await stores.claims.claim_due("me", 10)
        burst = await stores.bursts.begin(claim)
        assert isinstance(burst, Burst)
        reply = RecordedReply("m0", "hello", 1, burst.messages[0].received_at)
        assert await stores.bursts.mark_sending(claim, burst, 0, reply) is None
        held = await stores.sends.resend_lease_left(claim, burst.id, 0)
        other_part = await stores.sends.resend_lease_left(claim, burst.id, 1)
        stale = await stores.sends.resend_lease_left(replace(claim, fence=claim.fence - 1), burst.id, 0)
        await stores.bursts.part_sent(claim, burst, 0)
        cleared = await stores.sends.resend_lease_left(claim, burst.id, 0)
        return [held, other_part, stale, cleared]

    held, other_part, stale, cleared = run(database_url, scenario)
    assert held is not None and 0 < held <= 5.0
    assert (other_part, stale, cleared) == (None, None, None)
