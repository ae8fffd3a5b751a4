"""Group commit: concurrent writes share statements, and each caller still gets its own committed result."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.conftest import customer_message
from tests.test_claim import Sql, make_due, run
from watibot.batching import Batcher
from watibot.db import DatabaseUnavailable, LeaseLost, StatementFailed
from watibot.payload import CustomerMessage, parse_event
from watibot.store import Stores
from watibot.store.records import Burst, BurstStatus, IngestResult, RecordedReply


async def settled(predicate: Callable[[], bool]) -> None:
    """Let the event loop run until `predicate` holds (a bounded number of turns; no clock involved)."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


class Recorder:
    """A `run` for a Batcher that records its batches; it waits for `release` before answering."""

    def __init__(self, fail_on: object = None, error: Exception | None = None) -> None:
        self.batches: list[list[object]] = []
        self.release = asyncio.Event()
        self.fail_on = fail_on
        self.error = error or ValueError("bad item")

    async def __call__(self, items: list[object]) -> Sequence[object | Exception]:
        self.batches.append(items)
        await self.release.wait()
        if self.fail_on in items:
            raise self.error
        return [f"done {item}" for item in items]


def test_callers_arriving_during_a_batch_share_the_next_one() -> None:
    """One batch runs at a time here: the 20 callers that arrive meanwhile go together, each gets its result."""
    async def main() -> tuple[list[list[object]], list[object]]:
        recorder = Recorder()
        batcher: Batcher[object, object] = Batcher(recorder, timeout=30, max_running=1)
        first = asyncio.create_task(batcher.submit(0))
        await settled(lambda: len(recorder.batches) == 1)  # the first batch runs with item 0 alone
        rest = [asyncio.create_task(batcher.submit(n)) for n in range(1, 21)]
        await settled(lambda: batcher.waiting == 20)
        recorder.release.set()
        return recorder.batches, await asyncio.gather(first, *rest)

    batches, results = asyncio.run(main())
    assert batches == [[0], list(range(1, 21))]
    assert results == [f"done {n}" for n in range(21)]


def test_batches_are_capped_and_several_run_at_once() -> None:
    async def main() -> list[list[object]]:
        recorder = Recorder()
        batcher: Batcher[object, object] = Batcher(recorder, timeout=30, max_size=4, max_running=2)
        tasks = [asyncio.create_task(batcher.submit(n)) for n in range(10)]
        await settled(lambda: len(recorder.batches) == 2)
        assert batcher.waiting == 2  # two batches of 4 in flight, the rest waiting
        recorder.release.set()
        await asyncio.gather(*tasks)
        return recorder.batches

    batches = asyncio.run(main())
    assert sorted(len(batch) for batch in batches) == [2, 4, 4]
    assert sorted(item for batch in batches for item in batch) == list(range(10))  # type: ignore[type-var]


def batched_behind_a_first_one(recorder: Recorder, items: list[object], **options: Any) -> tuple[list[object], int]:
    """Submit `items` while a first batch runs, so they go out together in the second; their results (errors as
    values) and the number of batches `recorder` saw, re-runs included."""
    async def main() -> tuple[list[object], int]:
        batcher: Batcher[object, object] = Batcher(recorder, timeout=30, max_running=1, **options)
        first = asyncio.create_task(batcher.submit("first"))
        await settled(lambda: len(recorder.batches) == 1)
        tasks = [asyncio.create_task(batcher.submit(item)) for item in items]
        await settled(lambda: batcher.waiting == len(items))
        recorder.release.set()
        await first
        return list(await asyncio.gather(*tasks, return_exceptions=True)), len(recorder.batches)

    return asyncio.run(main())


def test_a_failing_item_fails_alone() -> None:
    """A statement error rolls the batch back; each item is run again alone and only the bad one fails."""
    results, batches = batched_behind_a_first_one(Recorder(fail_on=3), list(range(6)), rolled_back=(ValueError,))
    assert [r if not isinstance(r, Exception) else type(r).__name__ for r in results] == [
        "done 0", "done 1", "done 2", "ValueError", "done 4", "done 5"]
    assert batches == 2 + 6


def test_an_error_that_may_follow_the_commit_is_not_rerun() -> None:
    """Only errors declared `rolled_back` are re-run item by item; any other goes to every item of the batch."""
    recorder = Recorder(fail_on=1, error=KeyError("decoding the answer failed"))
    results, batches = batched_behind_a_first_one(recorder, [0, 1, 2], rolled_back=(ValueError,))
    assert all(isinstance(result, KeyError) for result in results)
    assert batches == 2


def test_an_unavailable_database_fails_the_whole_batch_without_rerunning_it() -> None:
    """Its outcome is unknown (it may have committed): nothing is run twice, every caller hears it."""
    recorder = Recorder(fail_on=1, error=DatabaseUnavailable("connection lost"))
    results, batches = batched_behind_a_first_one(recorder, [0, 1, 2])
    assert all(isinstance(result, DatabaseUnavailable) for result in results)
    assert batches == 2


def test_a_caller_cancelled_before_its_batch_starts_is_left_out() -> None:
    async def main() -> list[list[object]]:
        recorder = Recorder()
        batcher: Batcher[object, object] = Batcher(recorder, timeout=30, max_running=1)
        first = asyncio.create_task(batcher.submit("first"))
        await settled(lambda: len(recorder.batches) == 1)
        kept, dropped = asyncio.create_task(batcher.submit("kept")), asyncio.create_task(batcher.submit("dropped"))
        await settled(lambda: batcher.waiting == 2)
        dropped.cancel()
        await settled(dropped.done)
        recorder.release.set()
        await asyncio.gather(first, kept)
        return recorder.batches

    assert asyncio.run(main()) == [["first"], ["kept"]]


def test_a_hanging_batch_answers_its_callers_at_their_deadline() -> None:
    async def main() -> tuple[list[object], list[list[object]]]:
        recorder = Recorder()  # never released: the database hangs
        batcher: Batcher[object, object] = Batcher(recorder, timeout=0.2, max_running=1)
        hung = asyncio.create_task(batcher.submit("hung"))
        await settled(lambda: len(recorder.batches) == 1)
        queued = asyncio.create_task(batcher.submit("queued"))
        return list(await asyncio.gather(hung, queued, return_exceptions=True)), recorder.batches

    results, batches = asyncio.run(main())
    assert all(isinstance(result, DatabaseUnavailable) for result in results)
    assert batches[0] == ["hung"]


def test_an_item_past_its_deadline_is_not_started() -> None:
    async def main() -> tuple[object, list[list[object]]]:
        recorder = Recorder()
        recorder.release.set()
        batcher: Batcher[object, object] = Batcher(recorder, timeout=0)
        result = await asyncio.gather(batcher.submit("late"), return_exceptions=True)
        return result[0], recorder.batches

    result, batches = asyncio.run(main())
    assert isinstance(result, DatabaseUnavailable)
    assert batches == []


def test_linger_never_delays_a_caller_of_an_idle_batcher() -> None:
    async def main() -> list[list[object]]:
        recorder = Recorder()
        recorder.release.set()
        batcher: Batcher[object, object] = Batcher(recorder, timeout=30, max_running=1, linger=3600)
        task = asyncio.create_task(batcher.submit("alone"))
        await settled(task.done)  # an hour's linger would never let this settle
        return recorder.batches

    assert asyncio.run(main()) == [["alone"]]


def test_a_busy_batcher_lingers_so_the_next_batch_gathers_more() -> None:
    """Items arriving one by one while a batch runs and during the linger go out together."""
    async def main() -> list[list[object]]:
        recorder = Recorder()
        batcher: Batcher[object, object] = Batcher(recorder, timeout=30, max_running=1, linger=0.2)
        first = asyncio.create_task(batcher.submit("first"))
        await settled(lambda: len(recorder.batches) == 1)
        second = asyncio.create_task(batcher.submit("second"))
        await settled(lambda: batcher.waiting == 1)
        recorder.release.set()
        await first  # the batcher is now lingering with "second" waiting
        third = asyncio.create_task(batcher.submit("third"))
        await asyncio.gather(second, third)
        return recorder.batches

    assert asyncio.run(main()) == [["first"], ["second", "third"]]


def test_a_busy_batcher_with_a_large_next_batch_does_not_linger() -> None:
    async def main() -> list[list[object]]:
        recorder = Recorder()
        batcher: Batcher[object, object] = Batcher(recorder, timeout=30, max_running=1, linger=3600,
                                                   linger_below=2)
        first = asyncio.create_task(batcher.submit("first"))
        await settled(lambda: len(recorder.batches) == 1)
        rest = [asyncio.create_task(batcher.submit(name)) for name in ("second", "third")]
        await settled(lambda: batcher.waiting == 2)
        recorder.release.set()
        await settled(lambda: all(task.done() for task in rest))  # an hour's linger would never let this settle
        await first
        return recorder.batches

    assert asyncio.run(main()) == [["first"], ["second", "third"]]


# -- the repository's batches on a real PostgreSQL -----------------------------------------------------------------

def _message(wa_id: str, text: str, message_id: str) -> CustomerMessage:
    event = parse_event(customer_message(wa_id, text, message_id))
    assert isinstance(event, CustomerMessage)
    return event


def test_concurrent_webhooks_are_stored_once_each_in_shared_commits(database_url: str, sql: Sql) -> None:
    """300 concurrent ingests over 30 customers, each message delivered twice (some twice in one batch):
    every message is stored once, exactly one delivery of each is reported new, and commits were shared."""
    messages = [_message(f"5037100{n % 30:04d}", f"m{n}", f"wamid.batch.{n}") for n in range(150)]

    async def main(repository: Stores) -> tuple[list[bool], int]:
        results = await asyncio.gather(*(repository.ingest.ingest(m) for m in messages + messages[::-1]))
        return [result.duplicate for result in results], repository.ingest.batches.batches

    duplicates, batches = run(database_url, main)
    assert sum(not duplicate for duplicate in duplicates) == 150
    for n in range(150):  # message n is the n-th call and the (299 - n)-th
        assert duplicates[n] != duplicates[299 - n]
    assert batches < 100
    assert sql("SELECT count(*), count(DISTINCT provider_message_id) FROM watibot.message") == [(150, 150)]
    rows = sql("SELECT count(*), count(due_at), count(buffer_started_at) FROM watibot.conversation")
    assert rows == [(30, 30, 30)]


def test_a_message_the_database_refuses_fails_alone_in_its_batch(database_url: str, sql: Sql) -> None:
    """A row PostgreSQL cannot index (an id too long for a btree entry) gets its own error; the webhooks
    batched with it are stored."""
    # built past the parser, which refuses ids over 512 characters
    bad = dataclasses.replace(_message("50371000001", "bad", "wamid.bad"),
                              provider_message_id="wamid." + secrets.token_hex(3000))

    async def main(repository: Stores) -> list[object]:
        good = [repository.ingest.ingest(_message("50371000002", f"g{n}", f"wamid.good.{n}")) for n in range(10)]
        return await asyncio.gather(*good[:5], repository.ingest.ingest(bad), *good[5:], return_exceptions=True)

    results = run(database_url, main)
    assert isinstance(results[5], StatementFailed)
    assert results[5].sqlstate == "54000"  # program_limit_exceeded
    stored = [result for n, result in enumerate(results) if n != 5]
    assert all(isinstance(result, IngestResult) and not result.duplicate for result in stored)
    assert sql("SELECT count(*) FROM watibot.message") == [(10,)]


def test_burst_steps_of_many_conversations_share_statements_and_stay_fenced(database_url: str, sql: Sql) -> None:
    """60 conversations claimed (and their fresh bursts begun) by one statement run mark-sending and finish
    concurrently; a stale fence in the same batches is refused alone (LeaseLost) while its neighbours complete."""
    make_due(sql, 60, messages_each=2)

    async def main(repository: Stores) -> dict[str, Any]:
        claims = await repository.claims.claim_due("worker-a", 100)
        assert len(claims) == 60
        stale = claims[7]
        sql("UPDATE watibot.conversation SET fence = fence + 1 WHERE customer = %s", stale.customer)
        begun = await asyncio.gather(*(repository.bursts.begin(claim) for claim in claims), return_exceptions=True)
        reply = RecordedReply("prompt", "reply", 1, datetime.now(UTC))
        marks = await asyncio.gather(*(repository.bursts.mark_sending(claim, burst, 0, reply)
                                       for claim, burst in zip(claims, begun, strict=True)), return_exceptions=True)
        live = [(claim, burst) for claim, burst, mark in zip(claims, begun, marks, strict=True) if mark is None]
        waits = await asyncio.gather(*(repository.bursts.finish(claim, burst, BurstStatus.SENT, parts_sent=1)
                                       for claim, burst in live))
        return {"begun": begun, "marks": marks, "waits": waits, "live": len(live),
                "batches": [repository.bursts.begin_batches.batches, repository.bursts.mark_batches.batches,
                            repository.bursts.finish_batches.batches]}

    outcome = run(database_url, main)
    assert all(isinstance(burst, Burst) and burst.attempts == 1 for burst in outcome["begun"])
    assert isinstance(outcome["marks"][7], LeaseLost)
    assert outcome["live"] == 59
    assert outcome["waits"] == [None] * 59  # nothing left buffered
    begin_batches, mark_batches, finish_batches = outcome["batches"]
    assert begin_batches == 0  # the claim began every fresh burst itself
    assert mark_batches < 59 and finish_batches < 59
    assert sql("SELECT status, count(*), sum(messages) FROM watibot.burst GROUP BY status ORDER BY status") == [
        ("processing", 1, 2), ("sent", 59, 118)]  # the stale claim's burst is left to the fence's new holder


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_batches_and_heartbeats_over_the_same_conversations_do_not_deadlock(
    database_url: str, sql: Sql, order: str
) -> None:
    """Heartbeats (all claims) race batched sending marks (the same claims, submitted in either order): rows are
    locked in one order, so no statement is aborted as a deadlock."""
    make_due(sql, 80)
    reply = RecordedReply("prompt", "reply", 1, datetime.now(UTC))

    async def main(repository: Stores) -> list[object]:
        claims = await repository.claims.claim_due("worker-a", 100)
        assert all(claim.begun is not None for claim in claims)
        submitted = claims if order == "forward" else claims[::-1]
        heartbeats = [repository.claims.heartbeat("worker-a", claims[::-1] if n % 2 else claims) for n in range(6)]
        marks = (repository.bursts.mark_sending(c, c.begun, 0, reply) for c in submitted if c.begun is not None)
        return await asyncio.gather(*heartbeats, *marks, return_exceptions=True)

    results = run(database_url, main)
    assert not [result for result in results if isinstance(result, BaseException)]
    assert sql("SELECT count(*) FROM watibot.burst WHERE status = 'sending'") == [(80,)]


def test_messages_of_one_batch_keep_their_arrival_order(database_url: str, sql: Sql) -> None:
    """Positions follow the order webhooks reached the batch, not the order of their whatsappMessageIds (the
    order rows are inserted in): a burst of messages sent in the same second reaches the agent as it arrived."""
    provider_ids = [f"wamid.order.{9 - n}" for n in range(10)]  # sorted backwards

    async def main(repository: Stores) -> int:
        await asyncio.gather(*(repository.ingest.ingest(_message("50371000003", f"line {n}", provider_id))
                               for n, provider_id in enumerate(provider_ids)))
        return repository.ingest.batches.batches

    assert run(database_url, main) < 10
    assert [row[0] for row in sql("SELECT provider_message_id FROM watibot.message ORDER BY position")] == provider_ids
