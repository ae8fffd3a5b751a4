"""The burst's life as migrations/schema.sql draws it: high-water mark, and the edges the old design got wrong."""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import psycopg

from tests.conftest import RunningApp, app_settings, customer_message, sample, wait_until
from tests.fakes import Answer, FakeAgent, FakeWati, echo_reply
from tests.invariants import check_invariant, wait_drained
from tests.test_claim import make_due, run
from watibot.store import Stores
from watibot.store.records import Burst, Closed, RecordedReply
from watibot.sweeper import Sweeper

Sql = Callable[..., list[tuple[Any, ...]]]


def test_concurrent_webhooks_and_claims_never_skip_a_message(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent, sql: Sql
) -> None:
    """600 messages to 3 customers from 12 concurrent senders while bursts are claimed and closed all the time:
    every message is answered exactly once, and each conversation's positions are 1..n without a gap."""
    fake_agent.default = lambda request: Answer(body=echo_reply)
    app = run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url,
                               buffer_seconds=0.02, buffer_max_seconds=0.05, poll_seconds=0.05))
    texts = [f"hwm{n}" for n in range(600)]

    def send(text: str) -> str | None:
        number = int(text[3:])
        payload = customer_message(f"5037110000{number % 3}", text, f"wamid.{text}")
        payload["text"] = text
        return text if app.post(payload).status_code == 200 else None

    with ThreadPoolExecutor(12) as pool:
        acknowledged = {text for text in pool.map(send, texts) if text}
    assert len(acknowledged) == 600
    wait_drained(sql)
    counts = check_invariant(sql, fake_wati, acknowledged)
    assert counts["messages_sent"] == 600
    assert sql("SELECT customer, count(*), min(position), max(position) FROM watibot.message "
               "GROUP BY customer ORDER BY customer") == [
        (f"5037110000{n}", 200, 1, 200) for n in range(3)]
    assert sql("SELECT count(*) FROM watibot.conversation WHERE answered_position <> last_position") == [(0,)]


def test_a_delivery_failure_reported_while_a_later_part_is_sent_ends_in_attention(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent, sql: Sql
) -> None:
    """WATI reports part 1 failed while part 2 is on its way: the burst closes as attention, not sent, and
    nothing is sent again."""
    fake_agent.default = lambda request: Answer(body={"reply": "x" * 5000})  # two parts
    release = threading.Event()
    fake_wati.script = [Answer(), Answer(hang_until=release)]
    app = run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url,
                               lease_seconds=20.0, wati_timeout_seconds=10.0))
    app.post(customer_message("50376819621", "hello"))
    fake_wati.wait_for(lambda arrivals: len(arrivals) == 2, arrived=True)
    (burst_id,) = sql("SELECT id FROM watibot.burst")[0]
    failed = sample("session-message-failed", localMessageId=f"{burst_id}.1", waId="50376819621")
    assert app.post(failed).json() == {"status": "recorded"}
    release.set()
    (row,) = wait_until(lambda: sql("SELECT status, parts_sent, delivery_status, error FROM watibot.burst "
                                    "WHERE finished_at IS NOT NULL"))
    assert row[:3] == ("attention", 2, "failed")
    assert "delivery failed" in row[3]
    assert len(fake_wati.requests) == 2


def test_an_operator_who_writes_while_the_agent_works_keeps_the_bot_silent(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent, sql: Sql
) -> None:
    """The pause is checked again right before the first send: the reply is discarded (superseded), and after the
    pause the operator's answer stands (the messages close as human); nothing reaches WATI."""
    release = threading.Event()
    fake_agent.script = [Answer(body={"reply": "the bot's answer"}, hang_until=release)]
    app = run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url,
                               human_pause_seconds=1.0))
    app.post(customer_message("50376819621", "can a human help?"))
    fake_agent.wait_for(lambda arrivals: len(arrivals) == 1, arrived=True)
    assert app.post(sample("session-message-sent", waId="50376819621")).json() == {"status": "paused"}
    release.set()
    wait_until(lambda: sql("SELECT status FROM watibot.burst ORDER BY id") == [("superseded",), ("human",)],
               what="the reply discarded and the messages answered by the operator")
    wait_until(lambda: sql("SELECT due_at, claimed_by FROM watibot.conversation") == [(None, None)])
    assert sql("SELECT error FROM watibot.burst WHERE status = 'superseded'") == [
        ("an operator wrote to the customer while the agent worked: reply not sent",)]
    assert fake_wati.requests == []


def test_a_customer_who_keeps_typing_is_answered_once_the_buffer_reaches_its_maximum(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent, sql: Sql
) -> None:
    """Supersede stops at WATIBOT_BUFFER_MAX_SECONDS: a reply whose buffer is older than that is sent, and what
    arrived meanwhile gets its own burst."""
    release = threading.Event()
    fake_agent.script = [Answer(body={"reply": "answer to one"}, hang_until=release)]
    app = run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url, supersede=True,
                               buffer_seconds=0.3, buffer_max_seconds=1.0))
    app.post(customer_message("50376819621", "one"))
    fake_agent.wait_for(lambda arrivals: len(arrivals) == 1, arrived=True)
    app.post(customer_message("50376819621", "two"))
    wait_until(lambda: sql("SELECT now() - buffer_started_at > interval '1 second' FROM watibot.conversation")
               == [(True,)], what="the buffer to outgrow its maximum")
    release.set()
    fake_wati.wait_for_sent(2)
    assert [sent["text"] for sent in fake_wati.sent] == ["answer to one", "two"]
    wait_until(lambda: sql("SELECT status, messages FROM watibot.burst ORDER BY id") == [("sent", 1), ("sent", 1)])


def test_a_mark_that_would_land_after_its_callers_deadline_is_not_made(database_url: str, sql: Sql) -> None:
    """mark_sending run past the deadline its caller waits for writes nothing (outcome late): the caller, which
    gave up and will not send, leaves no "send in flight" for the next holder to close as attention."""
    make_due(sql, 1)

    async def scenario(stores: Stores) -> tuple[str, Any]:
        (claim,) = await stores.claims.claim_due("w", 10)
        burst = await stores.bursts.begin(claim)
        assert isinstance(burst, Burst)
        reply = RecordedReply("m0", "hello", 1, claim.database_now())
        late = claim.database_now() - timedelta(seconds=1)
        row = await stores.pool.fetchrow(
            "SELECT * FROM watibot.mark_sending(p_channel => $1, p_customer => $2, p_fence => $3, p_owner => $4, "
            "p_burst_id => $5, p_part => 0, p_not_after => $6, p_lease => 5, p_cover => 5, "
            "p_session_window => 86400, p_prompt => $7, p_reply => $8, p_reply_parts => 1, "
            "p_agent_started_at => now(), p_mode => 'fixed', p_window => 1, p_max => 1)",
            claim.channel, claim.customer, claim.fence, claim.owner, burst.id, late, reply.prompt, reply.text)
        on_time = await stores.bursts.mark_sending(claim, burst, 0, reply)
        return row["outcome"], on_time

    outcome, on_time = run(database_url, scenario)
    assert outcome == "late"
    assert on_time is None  # the same mark within its deadline is made
    assert sql("SELECT status, sending_part, reply FROM watibot.burst") == [("sending", 0, "hello")]


def test_the_sweeper_backs_off_when_the_due_conversation_is_locked_by_someone_else(
    database_url: str, sql: Sql
) -> None:
    """A due row that SKIP LOCKED passes over makes the sweeper look again a little later, not at once."""
    make_due(sql, 1)

    async def scenario(stores: Stores) -> tuple[float | None, int]:
        sweeper = Sweeper(stores.claims.settings, stores.claims, stores.instance,
                          types.SimpleNamespace(), "w")  # type: ignore[arg-type]  # nothing is claimed to run
        with psycopg.connect(database_url) as locker:
            locker.execute("SELECT 1 FROM watibot.conversation FOR UPDATE")
            wait = await sweeper._sweep_once()
            return wait, len(sweeper.in_flight)

    wait, launched = run(database_url, scenario)
    assert launched == 0
    assert wait is not None and wait >= 0.05


def test_replay_answers_the_same_messages_in_a_new_burst(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent, sql: Sql
) -> None:
    """A dead burst replayed after later bursts were answered: a new burst over exactly its messages, sent once;
    the later answers stand."""
    fake_agent.default = lambda request: Answer(body=echo_reply)
    fake_wati.script = [Answer(status=401)]  # the first burst dies (a permanent refusal)
    app = run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url))
    app.post(customer_message("50376819621", "first"))
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [("dead",)])
    app.post(customer_message("50376819621", "second"))
    fake_wati.wait_for_sent(1)
    (dead,) = sql("SELECT id FROM watibot.burst WHERE status = 'dead'")[0]

    async def replay(stores: Stores) -> Any:
        return await stores.operators.replay(dead)

    result = run(database_url, replay)
    assert (result.messages, result.due_now) == (1, True)
    fake_wati.wait_for_sent(2)
    assert [sent["text"] for sent in fake_wati.sent] == ["Received:\n1. second", "Received:\n1. first"]
    wait_until(lambda: sql("SELECT status, messages FROM watibot.burst ORDER BY id") == [
        ("replayed", 1), ("sent", 1), ("sent", 1)])
    assert sql("SELECT text, status FROM watibot.message_outcome ORDER BY position") == [
        ("first", "sent"), ("second", "sent")]


def test_later_parts_are_marked_whatever_the_pause_the_window_or_a_missing_deadline(
    database_url: str, sql: Sql
) -> None:
    """Part 2 of a half-sent reply is marked (send), never closed by part 1's rules: not when an operator's pause
    began, the session window closed, or the caller gave no deadline (a closed half-sent burst would be answered
    again: a second reply)."""
    make_due(sql, 1)

    async def scenario(stores: Stores) -> list[str]:
        (claim,) = await stores.claims.claim_due("w", 10)
        burst = await stores.bursts.begin(claim)
        assert isinstance(burst, Burst)
        assert await stores.bursts.mark_sending(claim, burst, 0, RecordedReply("m0", "a" * 5000, 2,
                                                                                 claim.database_now())) is None
        await stores.bursts.part_sent(claim, burst, 0)
        sql("UPDATE watibot.conversation SET paused_until = now() + interval '1 hour', "
            "last_customer_message_at = now() - interval '25 hours'")
        outcomes = []
        for deadline in (None, claim.database_now() + timedelta(seconds=30)):
            row = await stores.pool.fetchrow(
                "SELECT * FROM watibot.mark_sending(p_channel => $1, p_customer => $2, p_fence => $3, p_owner => $4, "
                "p_burst_id => $5, p_part => 1, p_not_after => $6, p_lease => 5, p_cover => 5, "
                "p_session_window => 86400, p_prompt => NULL, p_reply => NULL, p_reply_parts => NULL, "
                "p_agent_started_at => NULL, p_mode => 'fixed', p_window => 1, p_max => 1)",
                claim.channel, claim.customer, claim.fence, claim.owner, burst.id, deadline)
            outcomes.append(row["outcome"])
        return outcomes

    assert run(database_url, scenario) == ["send", "send"]
    assert sql("SELECT status, sending_part, parts_sent, finished_at FROM watibot.burst") == [("sending", 1, 1, None)]
    assert sql("SELECT answered_position, open_burst_id IS NOT NULL FROM watibot.conversation") == [(0, True)]


def test_closed_outcomes_of_the_first_mark_are_records(database_url: str, sql: Sql) -> None:
    """mark_sending on part 1 of a burst whose customer wrote outside the session window closes it as expired and
    says so; nothing is marked in flight."""
    make_due(sql, 1)
    sql("UPDATE watibot.conversation SET last_customer_message_at = now() - interval '25 hours'")

    async def scenario(stores: Stores) -> Any:
        (claim,) = await stores.claims.claim_due("w", 10)
        burst = await stores.bursts.begin(claim)
        assert isinstance(burst, Burst)
        return await stores.bursts.mark_sending(claim, burst, 0, RecordedReply("m0", "hi", 1, claim.database_now()))

    closed = run(database_url, scenario)
    assert isinstance(closed, Closed) and closed.reason == "expired"
    assert sql("SELECT status, sending_part, reply FROM watibot.burst") == [("expired", None, "hi")]
    assert sql("SELECT answered_position, last_position, open_burst_id FROM watibot.conversation") == [(1, 1, None)]


def test_mark_template_marks_the_template_only_outside_the_window(database_url: str, sql: Sql) -> None:
    """mark_template writes nothing while the customer is inside the session window (mark_sending decides) and,
    outside it, marks part 1 in flight with the template named and the reply recorded."""
    make_due(sql, 1)

    async def scenario(stores: Stores) -> list[Any]:
        (claim,) = await stores.claims.claim_due("w", 10)
        burst = await stores.bursts.begin(claim)
        assert isinstance(burst, Burst)
        reply = RecordedReply("m0", "hi", 1, claim.database_now())
        inside = await stores.bursts.mark_template(claim, burst, "reopen_chat", reply)
        untouched = await stores.pool.fetchrow("SELECT status, template, reply FROM watibot.burst")
        await stores.pool.execute(
            "UPDATE watibot.conversation SET last_customer_message_at = now() - interval '25 hours'")
        outside = await stores.bursts.mark_template(claim, burst, "reopen_chat", reply)
        return [inside, tuple(untouched), outside]

    assert run(database_url, scenario) == [False, ("processing", None, None), True]
    assert sql("SELECT status, sending_part, template, reply FROM watibot.burst") == [
        ("sending", 0, "reopen_chat", "hi")]


def test_webhooks_and_leases_keep_their_connections_while_bursts_hold_the_rest(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """Every connection of the bursts' pool taken: a webhook is still stored (200) and /readyz still answers, on
    the connections reserved for webhooks, claims and heartbeats."""
    import asyncio

    app = run_app(app_settings(database_url, fake_wati, db_pool_size=3))
    state = app.server.config.app.state  # type: ignore[union-attr]
    loop = app.sweeper._loop_task.get_loop()
    held: list[Any] = []

    async def take_all() -> None:
        pool = state.stores.bursts.pool
        held.extend([await pool.acquire() for _ in range(pool.get_max_size())])

    async def give_back() -> None:
        for conn in held:
            await state.stores.bursts.pool.release(conn)

    asyncio.run_coroutine_threadsafe(take_all(), loop).result(timeout=10)
    try:
        assert app.post(customer_message("50376819621", "still taken")).status_code == 200
        assert app.client.get("/readyz").status_code == 200
        assert sql("SELECT count(*) FROM watibot.message") == [(1,)]
    finally:
        asyncio.run_coroutine_threadsafe(give_back(), loop).result(timeout=10)


def test_a_replayed_burst_is_never_superseded_and_its_messages_are_answered(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, fake_agent: FakeAgent, sql: Sql
) -> None:
    """With supersede on, a customer who writes while a replayed burst's agent works does not discard the
    replay: it lies behind the high-water mark, where no later burst would answer its messages."""
    fake_agent.default = lambda request: Answer(body=echo_reply)
    fake_wati.script = [Answer(status=401)]
    app = run_app(app_settings(database_url, fake_wati, agent="http", agent_url=fake_agent.url, supersede=True))
    app.post(customer_message("50376819621", "first"))
    wait_until(lambda: sql("SELECT status FROM watibot.burst") == [("dead",)])
    app.post(customer_message("50376819621", "second"))
    fake_wati.wait_for_sent(1)
    wait_until(lambda: sql("SELECT count(*) FROM watibot.burst WHERE status = 'sent'") == [(1,)])
    (dead,) = sql("SELECT id FROM watibot.burst WHERE status = 'dead'")[0]
    release = threading.Event()
    fake_agent.script = [Answer(body=echo_reply, hang_until=release)]

    async def replay(stores: Stores) -> Any:
        return await stores.operators.replay(dead)

    run(database_url, replay)
    fake_agent.wait_for(lambda arrivals: len(arrivals) == 3, arrived=True)
    app.post(customer_message("50376819621", "third"))
    release.set()
    fake_wati.wait_for_sent(3)
    assert sorted(sent["text"] for sent in fake_wati.sent) == [
        "Received:\n1. first", "Received:\n1. second", "Received:\n1. third"]
    wait_until(lambda: sql("SELECT text, status FROM watibot.message_outcome ORDER BY position") == [
        ("first", "sent"), ("second", "sent"), ("third", "sent")])
    assert sql("SELECT count(*) FROM watibot.burst WHERE status = 'superseded'") == [(0,)]
