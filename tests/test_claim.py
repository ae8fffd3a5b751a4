"""The claim statement and the fencing around it, tested on the SQL itself."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import psycopg
import pytest

from tests.conftest import add_message, app_settings
from watibot import db
from watibot.db import LeaseLost
from watibot.payload import parse_event
from watibot.store import Stores
from watibot.store.records import Burst, BurstStatus, RecordedReply

Sql = Callable[..., list[tuple[Any, ...]]]
T = TypeVar("T")


def run(database_url: str, action: Callable[[Stores], Awaitable[T]], **overrides: Any) -> T:
    """Run `action` with the stores of its own pool."""
    settings = app_settings(database_url, **overrides)

    async def main() -> T:
        pool = await db.create_pool(settings, database_url)
        try:
            return await action(Stores.over(pool, settings))
        finally:
            await pool.close()

    return asyncio.run(main())


def make_due(sql: Sql, customers: int, messages_each: int = 1) -> None:
    """Insert buffered messages for `customers` conversations, all due now."""
    for number in range(customers):
        wa_id = f"5037{number:07d}"
        sql("INSERT INTO watibot.conversation (channel, customer, wa_id, due_at, buffer_started_at) "
            "VALUES ('c', %s, %s, now() - interval '1 second', now() - interval '2 seconds')", wa_id, wa_id)
        for index in range(messages_each):
            add_message(sql, wa_id, f"m{index}", provider_message_id=f"wamid.{wa_id}.{index}")
        sql("UPDATE watibot.message SET received_at = now() - interval '2 seconds' WHERE customer = %s", wa_id)


def test_concurrent_claimers_claim_every_due_conversation_exactly_once(database_url: str, sql: Sql) -> None:
    """Eight claimers racing over 400 due conversations: each is claimed once, none is missed."""
    make_due(sql, 400)

    async def race(repository: Stores) -> list[list[tuple[str, str]]]:
        async def claimer(number: int) -> list[tuple[str, str]]:
            mine: list[tuple[str, str]] = []
            while batch := await repository.claims.claim_due(f"worker-{number}", 7):
                mine += [(claim.channel, claim.customer) for claim in batch]
            return mine

        return await asyncio.gather(*(claimer(number) for number in range(8)))

    results = run(database_url, race, db_pool_size=8)
    claimed = [key for result in results for key in result]
    assert len(claimed) == 400
    assert len(set(claimed)) == 400
    assert sum(1 for result in results if result) > 1, "the claims should be spread over several claimers"
    assert sql("SELECT count(*) FROM watibot.conversation WHERE claimed_by IS NULL") == [(0,)]


def test_a_row_locked_by_one_claimer_is_skipped_by_another(database_url: str, sql: Sql) -> None:
    """While one transaction holds a due conversation, another claimer gets nothing (SKIP LOCKED), not a wait."""
    make_due(sql, 1)

    async def scenario(repository: Stores) -> tuple[int, int]:
        holder = await asyncpg.connect(database_url)
        try:
            transaction = holder.transaction()
            await transaction.start()
            await holder.execute("SELECT 1 FROM watibot.conversation FOR UPDATE")
            during = await asyncio.wait_for(repository.claims.claim_due("other", 10), timeout=2)
            await transaction.rollback()
        finally:
            await holder.close()
        after = await repository.claims.claim_due("other", 10)
        return len(during), len(after)

    assert run(database_url, scenario) == (0, 1)


def test_claim_uses_the_partial_due_index(database_url: str, sql: Sql) -> None:
    """The claim's plan (inside watibot.claim_due, shown by auto_explain) scans conversation_due_idx, never the
    whole conversation table, even with many idle conversations."""
    sql("INSERT INTO watibot.conversation (channel, customer) SELECT 'c', g::text FROM generate_series(1, 20000) g")
    make_due(sql, 50)
    sql("ANALYZE watibot.conversation")
    plans: list[str] = []
    with psycopg.connect(database_url) as conn:
        conn.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
        for setting in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                        "SET auto_explain.log_nested_statements = on", "SET auto_explain.log_format = json",
                        "SET auto_explain.log_level = notice"):
            conn.execute(setting)  # type: ignore[arg-type]
        from watibot.store.claims import CLAIM_DUE

        literal = CLAIM_DUE.replace("$1", "10").replace("$2", "'w'").replace("$3", "5").replace("$4", "true")
        claimed = conn.execute(literal).fetchall()  # type: ignore[call-overload]
        conn.rollback()
    assert len(claimed) == 10
    (claim_plan,) = [plan for plan in plans if "FOR UPDATE SKIP LOCKED" in plan and "array_agg(d.channel)" in plan]
    nodes = _plan_nodes(json.loads(claim_plan[claim_plan.index("{"):])["Plan"])
    assert any(node.get("Index Name") == "conversation_due_idx" for node in nodes)
    assert not [node for node in nodes if node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "conversation"]


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    """A plan node and every node below it."""
    return [node, *(below for child in node.get("Plans", []) for below in _plan_nodes(child))]


def test_expired_lease_is_taken_over_and_the_old_holder_is_fenced_out(database_url: str, sql: Sql) -> None:
    """After its lease expires a conversation is claimed again with a higher fence; the old holder's writes fail."""
    make_due(sql, 1)

    async def scenario(repository: Stores) -> tuple[Any, ...]:
        (first,) = await repository.claims.claim_due("old", 10)
        burst = await repository.bursts.begin(first)
        assert isinstance(burst, Burst)
        assert await repository.claims.claim_due("new", 10) == []  # lease still valid
        await repository.pool.execute(
            "UPDATE watibot.conversation SET lease_expires_at = now() - interval '1 second', "
            "due_at = now() - interval '1 second'")
        (second,) = await repository.claims.claim_due("new", 10)
        with pytest.raises(LeaseLost):
            await repository.bursts.mark_sending(first, burst, 0)
        with pytest.raises(LeaseLost):
            await repository.bursts.finish(first, burst, BurstStatus.SENT)
        resumed = await repository.bursts.begin(second)
        return first.fence, second.fence, second.previous_owner, resumed

    first_fence, second_fence, previous, resumed = run(database_url, scenario)
    assert second_fence == first_fence + 1
    assert previous == "old"
    assert isinstance(resumed, Burst) and resumed.attempts == 2
    assert sql("SELECT status, sending_part, claimed_by FROM watibot.burst") == [("processing", None, "new")]


def test_send_in_flight_at_takeover_goes_to_attention_not_resent(database_url: str, sql: Sql) -> None:
    """A burst whose previous holder recorded a send and vanished is marked attention, and its messages consumed."""
    make_due(sql, 1, messages_each=2)

    async def scenario(repository: Stores) -> Any:
        (first,) = await repository.claims.claim_due("old", 10)
        burst = await repository.bursts.begin(first)
        assert isinstance(burst, Burst)
        reply = RecordedReply("m0\nm1", "hello", 1, burst.messages[0].received_at)
        assert await repository.bursts.mark_sending(first, burst, 0, reply) is None
        await repository.pool.execute("UPDATE watibot.conversation SET due_at = now(), lease_expires_at = now()")
        (second,) = await repository.claims.claim_due("new", 10)
        return await repository.bursts.begin(second)

    closed = run(database_url, scenario)
    assert closed.reason == "attention"
    assert sql("SELECT status, error LIKE '%outcome unknown%' FROM watibot.burst") == [("attention", True)]
    assert sql("SELECT count(*) FROM watibot.message_outcome WHERE burst_id IS NULL") == [(0,)]
    assert sql("SELECT claimed_by, due_at FROM watibot.conversation") == [(None, None)]


@pytest.mark.parametrize(
    ("mode", "arrivals", "expected_due"),
    [
        # fixed: due = first message + window, however many follow
        ("fixed", [0, 2, 4], 10),
        # sliding: due = latest + window ...
        ("sliding", [0, 2, 4], 14),
        # ... capped at first + max (15 here)
        ("sliding", [0, 4, 8, 12], 15),
    ],
)
def test_buffer_window_modes(database_url: str, sql: Sql, mode: str, arrivals: list[int],
                             expected_due: float) -> None:
    """The conversation's due time follows the fixed or sliding window rule, from message arrival times."""
    from datetime import UTC, datetime, timedelta

    from tests.conftest import customer_message

    start = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

    async def scenario(repository: Stores) -> None:
        for number, offset in enumerate(arrivals):
            event = parse_event(customer_message("50371112222", f"m{number}"))
            await repository.ingest.ingest(event, arrived_at=start + timedelta(seconds=offset))  # type: ignore[arg-type]

    run(database_url, scenario, buffer_seconds=10.0, buffer_max_seconds=15.0, buffer_mode=mode)
    assert sql("SELECT due_at, buffer_started_at FROM watibot.conversation") == [
        (start + timedelta(seconds=expected_due), start)
    ]


def test_messages_during_processing_are_scheduled_by_the_window_at_completion(database_url: str,
                                                                               sql: Sql) -> None:
    """Messages that arrive while a burst is claimed are not in it, and completion makes them due first + window."""
    from tests.conftest import customer_message

    async def scenario(repository: Stores) -> tuple[list[str], list[str]]:
        await repository.ingest.ingest(parse_event(customer_message("50371113333", "first")))  # type: ignore[arg-type]
        await repository.pool.execute("UPDATE watibot.conversation SET due_at = now()")
        (claim,) = await repository.claims.claim_due("w", 10)
        burst = await repository.bursts.begin(claim)
        assert isinstance(burst, Burst)
        await repository.ingest.ingest(parse_event(customer_message("50371113333", "late")))  # type: ignore[arg-type]
        wait = await repository.bursts.finish(claim, burst, BurstStatus.SENT)
        assert wait is not None and 0 < wait <= 10.0
        assert await repository.claims.claim_due("w", 10) == []  # the late message waits for its own window
        await repository.pool.execute("UPDATE watibot.conversation SET due_at = now()")
        (claim,) = await repository.claims.claim_due("w", 10)
        second = await repository.bursts.begin(claim)
        assert isinstance(second, Burst)
        return [m.text or "" for m in burst.messages], [m.text or "" for m in second.messages]

    first, second = run(database_url, scenario, buffer_seconds=10.0)
    assert (first, second) == (["first"], ["late"])
