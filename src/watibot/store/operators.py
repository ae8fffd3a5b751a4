"""Statements behind `watibot status / conversation / dead / replay / prune` and `/metrics`.

Read-only but for replay and prune, and with no batching: building one per scrape costs nothing. They read the
views of migrations/schema.sql where one exists, so psql, the CLI and Prometheus agree on what "overdue" or
"dead" means.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from watibot.db import connection
from watibot.settings import Settings
from watibot.store.records import CONSUMING_STATUSES, OPEN_STATUSES, ConversationStory, ReplayRefused, ReplayResult

log = logging.getLogger("watibot.operators")

HEALTH = "SELECT * FROM watibot.health"

STATUS = """
SELECT
    count(*) FILTER (WHERE due_at > now() AND claimed_by IS NULL) AS buffering,
    count(*) FILTER (WHERE due_at <= now() AND claimed_by IS NULL) AS due,
    count(*) FILTER (WHERE claimed_by IS NOT NULL AND lease_expires_at > now()) AS in_flight,
    count(*) FILTER (WHERE claimed_by IS NOT NULL AND lease_expires_at <= now()) AS lease_expired,
    EXTRACT(EPOCH FROM now() - min(due_at) FILTER (WHERE due_at <= now()))::float8 AS oldest_due_seconds,
    COALESCE(sum(last_position - answered_position), 0)::bigint AS buffered_messages,
    (SELECT count(*) FROM watibot.burst WHERE status IN ('dead', 'attention')) AS dead,
    (SELECT count(*) FROM watibot.conversation WHERE paused_until > now()) AS paused
FROM watibot.conversation
WHERE due_at IS NOT NULL
"""

WORKERS_IN_FLIGHT = """
SELECT owner, count(*) AS held, min(lease_left_seconds)::float8 AS worst_lease_left_seconds,
       count(*) FILTER (WHERE lease_expired) AS expired
FROM watibot.in_flight
GROUP BY owner
ORDER BY owner
"""

# Counters and histograms for /metrics, computed from finished bursts (immutable once finished; a replay only
# changes status, and outcome reads replayed_from first) plus the totals of pruned bursts, so they only grow.
# Constant cost whatever the history (migration 0010_hardening): the rollup of the bursts finished before the mark, the
# totals of pruned bursts, and watibot.burst_range_totals over the few bursts finished since the mark (by
# burst_finished_idx). A label whose total is 0 (a rollup row emptied by prune) is left out, as before.
BURST_TOTALS = """
SELECT series, label, sum(count)::bigint AS count, sum(sum)::float8 AS sum
FROM (
    SELECT series, label, count, sum
    FROM watibot.burst_range_totals((SELECT rolled_through FROM watibot.burst_totals_mark), 'infinity')
    UNION ALL
    SELECT series, label, count, sum FROM watibot.burst_totals_rollup
    UNION ALL
    SELECT series, label, count, sum FROM watibot.pruned_burst_totals
) AS totals
GROUP BY series, label
HAVING sum(count) <> 0
"""

# Move the rollup's mark (a no-op unless it is more than 2 x ROLLUP_MARGIN old): bursts finished more than
# ROLLUP_MARGIN ago, at most ROLLUP_BATCH per call (the first scrapes after the upgrade catch up in steps).
ROLLUP_MARGIN_SECONDS = 300.0
ROLLUP_BATCH = 50_000
ROLL_UP = "SELECT watibot.roll_up_burst_totals(make_interval(secs => $1), $2)"

CONVERSATIONS_OF_CUSTOMER = """
SELECT channel, customer, wa_id, due_at, claimed_by, lease_expires_at, attempts, last_error
FROM watibot.conversation
WHERE customer = $1 OR wa_id = $1
ORDER BY channel, customer
"""

CONVERSATION_MESSAGES = """
SELECT message_id AS id, received_at, type, text, burst_id
FROM watibot.message_outcome
WHERE channel = $1 AND customer = $2
ORDER BY position
"""

CONVERSATION_BURSTS = """
SELECT id, status, replayed_from, attempts, messages, prompt, reply, error, created_at, sent_at, finished_at
FROM watibot.burst
WHERE channel = $1 AND customer = $2
ORDER BY id
"""

DEAD_BURSTS = """
SELECT burst_id, channel, customer, status, reason, attempts, messages, finished_at
FROM watibot.dead
LIMIT $1
"""

REPLAY = "SELECT * FROM watibot.replay_burst(p_burst_id => $1, p_force => $2)"

# One batch of `watibot prune`: the oldest finished bursts before the cutoff, the messages they answered (by
# position range: only a consuming burst's, $4), and their totals folded into pruned_burst_totals (the same
# grouping as BURST_TOTALS) so metrics keep counting them. Every part of the statement sees the rows before the
# deletes. SKIP LOCKED: a burst being replayed is left for later. Buffered messages (above answered_position)
# are never in a closed consuming burst's range, and open bursts (finished_at NULL) are never selected; $2 lists
# statuses to keep whatever their age (dead and attention unless --include-dead).
PRUNE_BATCH = """
WITH doomed AS (
    SELECT id, channel, customer, status, after_position, through_position FROM watibot.burst
    WHERE finished_at < $1 AND status <> ALL($2::text[])
    ORDER BY finished_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), folded AS (
    INSERT INTO watibot.pruned_burst_totals AS t (series, label, count, sum)
    SELECT series, label, count, sum FROM watibot.burst_fact_totals(COALESCE((SELECT array_agg(id) FROM doomed), '{}'))
    ON CONFLICT (series, label) DO UPDATE SET count = t.count + EXCLUDED.count, sum = t.sum + EXCLUDED.sum
), messages AS (
    DELETE FROM watibot.message AS m USING doomed AS d
    WHERE d.status = ANY($4::text[]) AND m.channel = d.channel AND m.customer = d.customer
      AND m.position > d.after_position AND m.position <= d.through_position
    RETURNING m.id
), bursts AS (
    DELETE FROM watibot.burst AS b USING doomed WHERE b.id = doomed.id RETURNING b.id
)
SELECT (SELECT count(*) FROM bursts) AS bursts, (SELECT count(*) FROM messages) AS messages
"""

_REPLAY_REFUSALS = {
    "unknown": "burst {id} does not exist",
    "not_replayable": "burst {id} is {status}: only dead or attention bursts can be replayed",
    "accepted": "burst {id} ({status}): WATI accepted its reply (in part or whole); a replay sends the customer "
                "another answer. Check `watibot conversation`, then use --force to replay anyway",
    "unknown_outcome": "burst {id} ({status}): its send's outcome is unknown, it may have reached the customer; "
                       "a replay may answer them twice. Check WATI's message history, then use --force",
    "busy": "burst {id} ({status}): its conversation has a burst in progress; replay it once that one is closed",
}


class OperatorStore:
    """Health, histories, replay, pruning and metric totals."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.timeout = settings.db_timeout_seconds

    async def status(self) -> dict[str, Any]:
        """Counts for `watibot status`."""
        async with connection(self.pool, self.timeout) as conn:
            row = await conn.fetchrow(STATUS)
        assert row is not None
        return dict(row)

    async def health(self) -> dict[str, Any]:
        """The one row of watibot.health."""
        async with connection(self.pool, self.timeout) as conn:
            row = await conn.fetchrow(HEALTH)
        assert row is not None
        return dict(row)

    async def workers_in_flight(self) -> list[dict[str, Any]]:
        """Claims held per worker, with the worst lease left."""
        async with connection(self.pool, self.timeout) as conn:
            return [dict(row) for row in await conn.fetch(WORKERS_IN_FLIGHT)]

    async def metrics_snapshot(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The health row and the burst totals read from one snapshot, so that a scrape is self-consistent.

        First moves the burst totals' rollup mark when it is due (its own short transaction). Every statement
        runs under a statement timeout of WATIBOT_DB_TIMEOUT_SECONDS: a scrape never holds a connection longer.
        """
        timeout_ms = str(max(1, int(self.timeout * 1000)))
        async with connection(self.pool, self.timeout) as conn:
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL statement_timeout = {timeout_ms}")
                    await conn.execute(ROLL_UP, ROLLUP_MARGIN_SECONDS, ROLLUP_BATCH)
            except asyncpg.PostgresError as error:  # a standby, a timeout: the totals are right without it
                log.debug("burst totals roll-up skipped: %s", error)
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await conn.execute(f"SET LOCAL statement_timeout = {timeout_ms}")
                health = await conn.fetchrow(HEALTH)
                totals = [dict(row) for row in await conn.fetch(BURST_TOTALS)]
        assert health is not None
        return dict(health), totals

    async def conversation_story(self, customer: str) -> list[ConversationStory]:
        """Every conversation of `customer` (waId or bsuid) with its messages and bursts, oldest first."""
        async with connection(self.pool, self.timeout) as conn, conn.transaction(isolation="repeatable_read"):
            stories = []
            for row in await conn.fetch(CONVERSATIONS_OF_CUSTOMER, customer):
                key = (row["channel"], row["customer"])
                messages = [dict(message) for message in await conn.fetch(CONVERSATION_MESSAGES, *key)]
                bursts = [dict(burst) for burst in await conn.fetch(CONVERSATION_BURSTS, *key)]
                stories.append(ConversationStory(dict(row), messages, bursts))
        return stories

    async def dead_bursts(self, limit: int) -> list[dict[str, Any]]:
        """Dead and attention bursts, oldest first."""
        async with connection(self.pool, self.timeout) as conn:
            return [dict(row) for row in await conn.fetch(DEAD_BURSTS, limit)]

    async def replay(self, burst_id: int, *, force: bool = False) -> ReplayResult:
        """Answer a dead or attention burst's messages again: a new burst over them, due now
        (watibot.replay_burst).

        A burst whose reply WATI accepted (in part or whole), or whose send has an unknown outcome, may have
        reached the customer: replaying it answers them again, so that takes `force`.
        """
        async with connection(self.pool, self.timeout) as conn:
            row = await conn.fetchrow(REPLAY, burst_id, force)
        assert row is not None
        if row["outcome"] != "replayed":
            raise ReplayRefused(_REPLAY_REFUSALS[row["outcome"]].format(id=burst_id, status=row["replayed_from"]))
        return ReplayResult(burst_id, row["channel"], row["customer"], row["replayed_from"], row["messages"],
                            row["due_now"], row["new_burst_id"])

    async def prune_batch(self, cutoff: datetime, keep: Sequence[str], batch: int) -> tuple[int, int]:
        """Delete one batch of bursts finished before `cutoff` (except those in a `keep` status) and the messages
        they answered: returns (bursts, messages)."""
        async with connection(self.pool, self.timeout) as conn:
            row = await conn.fetchrow(PRUNE_BATCH, cutoff, [*OPEN_STATUSES, *keep], batch,
                                      sorted(CONSUMING_STATUSES))
        assert row is not None
        return int(row["bursts"]), int(row["messages"])
