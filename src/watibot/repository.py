"""Every SQL statement watibot runs, and the transactions around them. No other module holds SQL.

Times come from the database clock (`now()`), so several hosts with skewed clocks agree on due times and leases.
Writes made by a claim holder check the fence in the same statement or function, after locking the conversation
row: a worker whose claim was taken over gets `LeaseLost` and changes nothing. Webhook inserts and the burst steps
run through `batching.Batcher`: concurrent callers share one statement and one commit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from watibot.batching import Batcher
from watibot.db import SCHEMA_REVISION as SCHEMA_REVISION_OF_CODE
from watibot.db import LeaseLost, StatementFailed, compatibility_problem, connection
from watibot.payload import CustomerMessage, DeliveryUpdate, OperatorMessage
from watibot.settings import Settings

# -- ingest ---------------------------------------------------------------------------------------------------

# One statement, one round trip, one commit for a batch of webhooks (see batching.py): store each message (once)
# and push its conversation's timer. The conversation upsert selects FROM new_message, so a duplicate delivery
# touches nothing. While a conversation is claimed its due_at is the lease expiry; the buffer is then scheduled
# by completion. Rows are locked in one fixed order (messages by id, conversations by key, byte order) so that
# concurrent batches, and the burst steps that lock conversations in the same order, never deadlock.
# The caller passes each whatsappMessageId at most once per batch.
INGEST_MESSAGES = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::timestamptz[], $8::text[], $9::text[], $10::timestamptz[])
        WITH ORDINALITY AS i(channel, customer, provider_message_id, wati_id, type, text, wati_timestamp,
                             payload, wa_id, arrived_at, position)
), numbered AS (
    -- Ids in arrival order (the order of the batch), which orders messages of the same WATI second in a burst;
    -- the rows are then inserted in id-string order, the lock order every batch shares.
    SELECT input.*, nextval('watibot.message_id_seq') AS id FROM input ORDER BY position
), new_message AS (
    INSERT INTO watibot.message
        (id, channel, customer, provider_message_id, wati_id, type, text, wati_timestamp, payload, received_at)
    OVERRIDING SYSTEM VALUE
    SELECT id, channel, customer, provider_message_id, wati_id, type, text, wati_timestamp, payload::jsonb,
           COALESCE(arrived_at, now())
    FROM numbered
    ORDER BY provider_message_id COLLATE "C"
    ON CONFLICT (provider_message_id) DO NOTHING
    RETURNING id, channel, customer, provider_message_id, received_at
), arrived AS (
    SELECT m.channel, m.customer, min(m.received_at) AS first_at, max(m.received_at) AS last_at,
           (array_agg(i.wa_id ORDER BY i.position DESC) FILTER (WHERE i.wa_id IS NOT NULL))[1] AS wa_id
    FROM new_message AS m JOIN input AS i USING (provider_message_id)
    GROUP BY m.channel, m.customer
), pushed AS (
    INSERT INTO watibot.conversation AS c (channel, customer, wa_id, due_at, buffer_started_at)
    SELECT channel, customer, wa_id,
           CASE WHEN $12 = 'sliding' THEN LEAST(last_at + make_interval(secs => $11),
                                                first_at + make_interval(secs => $13))
                ELSE first_at + make_interval(secs => $11) END,
           first_at
    FROM arrived
    ORDER BY channel COLLATE "C", customer COLLATE "C"
    ON CONFLICT (channel, customer) DO UPDATE SET
        wa_id = COALESCE(EXCLUDED.wa_id, c.wa_id),
        due_at = CASE
            WHEN c.claimed_by IS NOT NULL THEN c.due_at
            WHEN c.due_at IS NULL THEN EXCLUDED.due_at
            -- sliding: later with each message, never past first + max, never earlier than already set
            WHEN $12 = 'sliding' THEN GREATEST(c.due_at,
                LEAST(EXCLUDED.due_at, c.buffer_started_at + make_interval(secs => $13)))
            ELSE c.due_at
        END,
        buffer_started_at = CASE
            WHEN c.claimed_by IS NULL AND c.due_at IS NULL THEN EXCLUDED.buffer_started_at
            ELSE c.buffer_started_at
        END,
        updated_at = EXCLUDED.updated_at
    RETURNING c.channel, c.customer, c.due_at
)
SELECT new_message.id AS message_id, new_message.received_at, pushed.due_at
FROM input
LEFT JOIN new_message USING (provider_message_id)
LEFT JOIN pushed ON pushed.channel = input.channel AND pushed.customer = input.customer
ORDER BY input.position
"""

# An operator wrote to the customer: pause the bot for the conversation. A conversation that is buffering is
# pushed to the end of the pause; a claimed one finds the pause when it next begins a burst.
OPERATOR_MESSAGE = """
INSERT INTO watibot.conversation AS c (channel, customer, wa_id, paused_until, human_message_at)
SELECT $1, $2, $3, now() + make_interval(secs => $4), now()
WHERE NOT EXISTS (SELECT 1 FROM watibot.burst WHERE id = $5)
ON CONFLICT (channel, customer) DO UPDATE SET
    paused_until = GREATEST(c.paused_until, EXCLUDED.paused_until),
    human_message_at = EXCLUDED.human_message_at,
    due_at = CASE WHEN c.claimed_by IS NULL AND c.due_at IS NOT NULL
                  THEN GREATEST(c.due_at, EXCLUDED.paused_until) ELSE c.due_at END,
    updated_at = now()
RETURNING 1
"""

# WATI's report on a reply we sent. A failed delivery is never re-sent automatically (WATI accepted the message
# once; a repeat could reach the customer twice, and 24-hour window failures cannot succeed): the burst goes to
# attention with the reason.
DELIVERY_UPDATE = """
UPDATE watibot.burst AS b SET
    delivery_status = CASE
        WHEN $2 = 'failed' OR b.delivery_status = 'failed' THEN 'failed'
        WHEN $2 = 'replied' OR b.delivery_status = 'replied' THEN 'replied'
        WHEN $2 = 'read' OR b.delivery_status = 'read' THEN 'read'
        ELSE 'delivered' END,
    delivered_at = CASE WHEN $2 <> 'failed' THEN COALESCE(b.delivered_at, now()) ELSE b.delivered_at END,
    read_at = CASE WHEN $2 IN ('read', 'replied') THEN COALESCE(b.read_at, now()) ELSE b.read_at END,
    delivery_error = COALESCE($3, b.delivery_error),
    status = CASE WHEN $2 = 'failed' AND b.status = 'sent' THEN 'attention' ELSE b.status END,
    error = CASE WHEN $2 = 'failed' THEN 'WhatsApp delivery failed after WATI accepted the reply: ' || $3
                 ELSE b.error END
FROM watibot.conversation AS c
WHERE b.id = $1
  -- only the burst of the customer (and channel) the report names: anyone can post a localMessageId
  AND c.channel = b.channel AND c.customer = b.customer
  AND (c.customer = $4 OR c.wa_id = $5)
  AND ($6::text IS NULL OR b.channel = $6)
RETURNING b.id
"""

# -- claim ------------------------------------------------------------------------------------------------------

# One statement claims a batch:
# - `due_at <= now()` ORDER BY due_at is served by the partial index conversation_due_idx (idle rows are not in it);
# - a claimed row's due_at is its lease expiry, so an expired lease is simply due again: takeover needs no
#   second predicate;
# - SKIP LOCKED lets N claimers run at once without waiting on each other or on a webhook holding a row;
# - the fence is incremented so the previous holder's writes fail from now on.
CLAIM_DUE = """
WITH due AS (
    SELECT channel, customer, claimed_by AS previous_owner, due_at AS was_due_at
    FROM watibot.conversation
    WHERE due_at <= now()
    ORDER BY due_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE watibot.conversation AS c SET
    claimed_by = $2,
    claimed_at = now(),
    fence = c.fence + 1,
    lease_expires_at = now() + make_interval(secs => $3),
    due_at = now() + make_interval(secs => $3),
    updated_at = now()
FROM due
WHERE c.channel = due.channel AND c.customer = due.customer
RETURNING c.channel, c.customer, c.wa_id, c.fence, due.previous_owner, due.was_due_at, c.claimed_at
"""

NEXT_DUE = """
SELECT (SELECT min(due_at) FROM watibot.conversation WHERE due_at IS NOT NULL) - now() AS wait
"""

# Conversation rows are locked in key byte order, as every batch locks them.
HEARTBEAT = """
WITH held AS (
    SELECT c.channel, c.customer
    FROM unnest($1::text[], $2::text[], $3::bigint[]) AS h(channel, customer, fence)
    JOIN watibot.conversation AS c
        ON c.channel = h.channel AND c.customer = h.customer AND c.fence = h.fence AND c.claimed_by = $5
    ORDER BY c.channel COLLATE "C", c.customer COLLATE "C"
    FOR UPDATE OF c
)
UPDATE watibot.conversation AS c SET
    lease_expires_at = now() + make_interval(secs => $4),
    due_at = now() + make_interval(secs => $4)
FROM held
WHERE c.channel = held.channel AND c.customer = held.customer
RETURNING c.channel, c.customer
"""

# The burst steps, for a batch of bursts (see batching.py): one statement calls the step's function (migrations
# 0004, 0005) once per burst, in conversation-key byte order (the subquery's ORDER BY: the order in which every
# batch, ingest and the heartbeat lock conversation rows, so they never deadlock), and returns the results in the
# order given. Each function locks its conversation row and checks the fence before it reads or writes.
BEGIN_BURSTS = """
SELECT b.*
FROM (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::timestamptz[])
        WITH ORDINALITY AS i(channel, customer, fence, owner, due_at, position)
    ORDER BY channel COLLATE "C", customer COLLATE "C"
) AS i
CROSS JOIN LATERAL watibot.begin_burst(i.channel, i.customer, i.fence, i.owner, i.due_at, $6, $7, $8, $9, $10) AS b
ORDER BY i.position
"""

FINISH_BURSTS = """
SELECT b.*
FROM (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::text[], $7::text[],
                         $8::integer[], $9::text[], $10::text[], $11::timestamptz[], $12::boolean[])
        WITH ORDINALITY AS i(channel, customer, fence, owner, burst_id, status, error, parts_sent, prompt, reply,
                             agent_started_at, consume, position)
    ORDER BY channel COLLATE "C", customer COLLATE "C"
) AS i
CROSS JOIN LATERAL watibot.finish_burst(i.channel, i.customer, i.fence, i.owner, i.burst_id, i.status, i.error,
                                        i.parts_sent, i.prompt, i.reply, i.agent_started_at, i.consume,
                                        $13, $14, $15) AS b
ORDER BY i.position
"""

# Before a part goes to WATI: extend the lease, record the reply (first time), mark the part in flight, unless
# the session window has closed (may_send false). held false: the fence no longer matches.
MARK_SENDINGS = """
SELECT b.*
FROM (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::integer[],
                         $7::text[], $8::text[], $9::integer[], $10::timestamptz[])
        WITH ORDINALITY AS i(channel, customer, fence, owner, burst_id, part, prompt, reply, reply_parts,
                             agent_started_at, position)
    ORDER BY channel COLLATE "C", customer COLLATE "C"
) AS i
CROSS JOIN LATERAL watibot.mark_sending(i.channel, i.customer, i.fence, i.owner, $11, i.burst_id, i.part, $12,
                                        i.prompt, i.reply, i.reply_parts, i.agent_started_at) AS b
ORDER BY i.position
"""

# Fenced single-row writes to the burst: the conversation row is locked (and the fence checked) in the same
# statement.
MARK_PART_SENT = """
WITH held AS (
    SELECT 1 FROM watibot.conversation
    WHERE channel = $1 AND customer = $2 AND fence = $3 AND claimed_by = $4
    FOR UPDATE
)
UPDATE watibot.burst SET sending_part = NULL, parts_sent = $6 + 1
WHERE id = $5 AND EXISTS (SELECT 1 FROM held)
RETURNING id
"""

CLEAR_SENDING = """
WITH held AS (
    SELECT 1 FROM watibot.conversation
    WHERE channel = $1 AND customer = $2 AND fence = $3 AND claimed_by = $4
    FOR UPDATE
)
UPDATE watibot.burst SET sending_part = NULL WHERE id = $5 AND EXISTS (SELECT 1 FROM held)
RETURNING id
"""

# Release the claim with the conversation due again later; the burst keeps its messages, reply and progress.
# $7: the burst's new status ('retry'); $8: attempts to count (a hand-back at shutdown does not count one).
RELEASE_FOR_LATER = """
WITH held AS (
    -- Locked first, as every holder write does: a takeover committing meanwhile is seen, and nothing is written.
    SELECT 1 FROM watibot.conversation
    WHERE channel = $1 AND customer = $2 AND fence = $3 AND claimed_by = $4
    FOR UPDATE
), burst AS (
    UPDATE watibot.burst SET status = 'retry', error = COALESCE($8, error), attempts = attempts - $9
    WHERE id = $5 AND EXISTS (SELECT 1 FROM held)
    RETURNING attempts
)
UPDATE watibot.conversation SET
    claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL,
    due_at = now() + make_interval(secs => $6), attempts = COALESCE((SELECT attempts FROM burst), $7),
    last_error = $8, updated_at = now()
WHERE channel = $1 AND customer = $2 AND fence = $3 AND claimed_by = $4 AND EXISTS (SELECT 1 FROM held)
RETURNING 1
"""

NEWER_MESSAGES = """
SELECT EXISTS (
    SELECT 1 FROM watibot.message
    WHERE channel = $1 AND customer = $2 AND burst_id IS NULL AND NOT (id = ANY($3::bigint[]))
)
"""

# The customer's earlier answered bursts, newest first, for an agent's memory.
HISTORY = """
SELECT prompt, reply FROM watibot.burst
WHERE channel = $1 AND customer = $2 AND id < $3 AND status = 'sent' AND prompt IS NOT NULL AND reply IS NOT NULL
ORDER BY id DESC
LIMIT $4
"""

STATUS = """
SELECT
    count(*) FILTER (WHERE due_at > now() AND claimed_by IS NULL) AS buffering,
    count(*) FILTER (WHERE due_at <= now() AND claimed_by IS NULL) AS due,
    count(*) FILTER (WHERE claimed_by IS NOT NULL AND lease_expires_at > now()) AS in_flight,
    count(*) FILTER (WHERE claimed_by IS NOT NULL AND lease_expires_at <= now()) AS lease_expired,
    EXTRACT(EPOCH FROM now() - min(due_at) FILTER (WHERE due_at <= now()))::float8 AS oldest_due_seconds,
    (SELECT count(*) FROM watibot.message WHERE burst_id IS NULL) AS buffered_messages,
    (SELECT count(*) FROM watibot.burst WHERE status IN ('dead', 'attention')) AS dead,
    (SELECT count(*) FROM watibot.conversation WHERE paused_until > now()) AS paused
FROM watibot.conversation
WHERE due_at IS NOT NULL
"""

GET_OR_CREATE_GENERATED = """
WITH created AS (
    INSERT INTO watibot.instance_secret (name, value) VALUES ($1, $2)
    ON CONFLICT (name) DO NOTHING
    RETURNING value
)
SELECT value FROM created UNION ALL SELECT value FROM watibot.instance_secret WHERE name = $1
LIMIT 1
"""

SCHEMA_REVISION = "SELECT version_num FROM watibot.alembic_version"

# The schema's revision and, since 0006, which code revisions each schema revision serves (db.compatibility_problem).
SCHEMA_COMPATIBILITY = """
SELECT (SELECT version_num FROM watibot.alembic_version) AS revision,
       to_regclass('watibot.schema_compatibility') IS NOT NULL AS declared,
       current_setting('transaction_read_only') = 'on' AS read_only
"""
COMPATIBILITY_ROWS = "SELECT revision, position, oldest_code_revision FROM watibot.schema_compatibility"


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What storing one webhook message did."""

    duplicate: bool
    wait_seconds: float | None  # seconds from now until the conversation is due, when it was pushed


@dataclass(frozen=True, slots=True)
class Claim:
    """A conversation this worker holds, fenced by `fence`."""

    channel: str
    customer: str
    wa_id: str | None
    fence: int
    owner: str
    previous_owner: str | None
    was_due_at: datetime | None
    claimed_at: datetime | None = None  # the database clock at the claim
    claimed_monotonic: float = field(default_factory=time.monotonic)  # this host's monotonic clock then

    def database_now(self) -> datetime:
        """The database clock now, as measured from the claim: host clocks may be skewed, elapsed time is not."""
        base = self.claimed_at or datetime.now(UTC)
        return base + timedelta(seconds=time.monotonic() - self.claimed_monotonic)


@dataclass(frozen=True, slots=True)
class BufferedMessage:
    """A message as the pipeline sees it."""

    id: int
    provider_message_id: str
    type: str
    text: str | None
    wati_timestamp: datetime | None
    received_at: datetime
    data: Any


@dataclass(frozen=True, slots=True)
class Burst:
    """An attempt at a burst, as begun for a claim."""

    id: int
    attempts: int
    messages: list[BufferedMessage]
    reply: str | None
    reply_parts: int | None
    parts_sent: int


@dataclass(frozen=True, slots=True)
class Closed:
    """`begin_burst` found nothing to process: the claim was released (wait = seconds until due again)."""

    reason: str
    wait_seconds: float | None


@dataclass(frozen=True, slots=True)
class RecordedReply:
    """The agent's answer, kept with the burst before anything is sent."""

    prompt: str
    text: str
    parts: int
    agent_started_at: datetime


def _timestamp(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _lost(claim: Claim) -> LeaseLost:
    """The error for a write refused because `claim`'s fence no longer matches."""
    return LeaseLost(f"conversation {claim.channel}/{claim.customer} fence {claim.fence}")


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value.total_seconds())


@dataclass(frozen=True, slots=True)
class _Ingest:
    message: CustomerMessage
    arrived_at: datetime | None


@dataclass(frozen=True, slots=True)
class _Mark:
    claim: Claim
    burst_id: int
    part: int
    reply: RecordedReply | None


@dataclass(frozen=True, slots=True)
class _Finish:
    claim: Claim
    burst_id: int
    status: str
    error: str | None
    parts_sent: int | None
    prompt: str | None
    reply: str | None
    agent_started_at: datetime | None
    consume: bool


def _claim_columns(claims: list[Claim]) -> tuple[list[str], list[str], list[int], list[str]]:
    return ([c.channel for c in claims], [c.customer for c in claims], [c.fence for c in claims],
            [c.owner for c in claims])


def _begun(claim: Claim, row: asyncpg.Record) -> Burst | Closed | LeaseLost:
    if row["outcome"] == "lost":
        return _lost(claim)
    if row["outcome"] != "run":
        return Closed(row["outcome"], row["wait_seconds"])
    messages = [
        BufferedMessage(
            id=item["id"], provider_message_id=item["provider_message_id"], type=item["type"],
            text=item["text"], wati_timestamp=_timestamp(item["wati_timestamp"]),
            received_at=_timestamp(item["received_at"]) or datetime.now(UTC), data=item["data"],
        )
        for item in row["messages"]
    ]
    return Burst(row["burst_id"], row["attempts"], messages, row["reply"], row["reply_parts"], row["parts_sent"])


class Repository:
    """Database operations over one pool."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.timeout = settings.db_timeout_seconds
        # Group commit (batching.py): webhooks, and each burst step, of this worker share statements and commits.
        # Each caller gets its answer, or DatabaseUnavailable, within the database timeout.
        t, server = self.timeout, (StatementFailed,)
        # Ingest runs one batch at a time per worker and, when busy with small batches, lets the next one gather
        # for 1 ms: fewer, larger commits. PostgreSQL 15 here, wrk -c64, 2 runs each: 4 workers 4.8-5.5 k/s and
        # 5-7 webhooks per commit without it, 5.8-5.9 k/s and 9 per commit with it; 1 worker 4.6-5.1 -> 5.4-5.6 k/s.
        self.ingest_batches: Batcher[_Ingest, IngestResult] = Batcher(
            self._ingest_many, timeout=t, rolled_back=server, max_running=1, name="ingest", linger=0.001)
        self.begin_batches: Batcher[Claim, Burst | Closed | LeaseLost] = Batcher(
            self._begin_many, timeout=t, rolled_back=server, name="begin")
        self.mark_batches: Batcher[_Mark, bool | LeaseLost] = Batcher(
            self._mark_many, timeout=t, rolled_back=server, name="mark")
        self.finish_batches: Batcher[_Finish, float | LeaseLost | None] = Batcher(
            self._finish_many, timeout=t, rolled_back=server, name="finish")

    async def _fetch_batch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with connection(self.pool, self.timeout) as conn:  # the Batcher bounds the whole wait
            return list(await conn.fetch(query, *args))

    # -- ingest --

    async def ingest(self, message: CustomerMessage, arrived_at: datetime | None = None) -> IngestResult:
        """Store a customer message and push its conversation's due time; returns once that is committed.

        Concurrent calls share one statement and commit (group commit). `arrived_at` replaces the database
        clock for tests of the window rules; the service passes None. Raises `DatabaseUnavailable` within the
        database timeout: the sender gets a 503 in bounded time, never a hang.
        """
        return await self.ingest_batches.submit(_Ingest(message, arrived_at))

    async def _ingest_many(self, items: list[_Ingest]) -> list[IngestResult]:
        s = self.settings
        first: dict[str, int] = {}  # a whatsappMessageId twice in one batch: the second is a duplicate
        unique = [first.setdefault(item.message.provider_message_id, n) == n for n, item in enumerate(items)]
        batch = [item for item, keep in zip(items, unique, strict=True) if keep]
        messages = [item.message for item in batch]
        rows = await self._fetch_batch(
            INGEST_MESSAGES,
            [m.channel for m in messages], [m.customer for m in messages], [m.provider_message_id for m in messages],
            [m.wati_id for m in messages], [m.type for m in messages], [m.text for m in messages],
            [m.wati_timestamp for m in messages], [json.dumps(m.payload) for m in messages],
            [m.wa_id for m in messages], [item.arrived_at for item in batch],
            s.buffer_seconds, s.buffer_mode.value, s.buffer_max_seconds,
        )
        stored = iter(rows)
        results = []
        for keep in unique:
            row = next(stored) if keep else None
            if row is None or row["message_id"] is None:
                results.append(IngestResult(duplicate=True, wait_seconds=None))
                continue
            wait = None if row["due_at"] is None else (row["due_at"] - row["received_at"]).total_seconds()
            results.append(IngestResult(duplicate=False, wait_seconds=wait))
        return results

    async def operator_message(self, event: OperatorMessage) -> bool:
        """Pause the bot for the customer an operator wrote to; False when the message was one of our replies."""
        async with connection(self.pool, self.timeout) as conn:
            row = await conn.fetchval(
                OPERATOR_MESSAGE, event.channel, event.customer, event.wa_id, self.settings.human_pause_seconds,
                event.our_burst_id,
            )
        return row is not None

    async def delivery_update(self, event: DeliveryUpdate) -> bool:
        """Record WATI's delivery report on one of our bursts; False when no such burst exists."""
        async with connection(self.pool, self.timeout) as conn:
            row = await conn.fetchval(DELIVERY_UPDATE, event.burst_id, event.state, event.error, event.customer,
                                      event.wa_id, event.channel)
        return row is not None

    # -- claims --

    async def claim_due(self, owner: str, limit: int) -> list[Claim]:
        """Claim up to `limit` due conversations (free, or with an expired lease) for `owner`."""
        async with connection(self.pool, self.timeout) as conn:
            rows = await conn.fetch(CLAIM_DUE, limit, owner, self.settings.lease_seconds)
        return [
            Claim(row["channel"], row["customer"], row["wa_id"], row["fence"], owner, row["previous_owner"],
                  row["was_due_at"], row["claimed_at"])
            for row in rows
        ]

    async def next_due_wait(self) -> float | None:
        """Seconds until the earliest due conversation (negative if overdue), or None when nothing is scheduled."""
        async with connection(self.pool, self.timeout) as conn:
            return _seconds(await conn.fetchval(NEXT_DUE))

    async def heartbeat(self, owner: str, claims: Sequence[Claim]) -> set[tuple[str, str]]:
        """Extend the leases of `claims`; returns the (channel, customer) keys still held."""
        if not claims:
            return set()
        async with connection(self.pool, self.timeout) as conn:
            rows = await conn.fetch(
                HEARTBEAT, [claim.channel for claim in claims], [claim.customer for claim in claims],
                [claim.fence for claim in claims], self.settings.lease_seconds, owner,
            )
        return {(row["channel"], row["customer"]) for row in rows}

    # -- bursts --

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with connection(self.pool, self.timeout) as conn:
            return await conn.fetchrow(query, *args)

    def _claim_args(self, claim: Claim) -> tuple[str, str, int, str]:
        return claim.channel, claim.customer, claim.fence, claim.owner

    def _window_args(self) -> tuple[str, float, float]:
        s = self.settings
        return s.buffer_mode.value, s.buffer_seconds, s.buffer_max_seconds

    async def begin_burst(self, claim: Claim) -> Burst | Closed:
        """Start (or resume) the conversation's burst under `claim`, or close what cannot go on.

        A burst left with a send in flight by a previous holder has an unknown outcome: it goes to attention,
        never re-sent. One past its attempts goes dead. A burst with a recorded reply resumes sending after the
        parts already accepted; one without a reply is rebuilt from the whole buffer. A conversation an
        operator took over waits for the pause to end; messages the operator answered are closed as `human`.
        """
        begun = await self.begin_batches.submit(claim)  # a refused fence raises LeaseLost
        assert not isinstance(begun, LeaseLost)
        return begun

    async def _begin_many(self, claims: list[Claim]) -> list[Burst | Closed | LeaseLost]:
        s = self.settings
        rows = await self._fetch_batch(
            BEGIN_BURSTS, *_claim_columns(claims), [c.was_due_at for c in claims],
            s.max_attempts, s.human_answered == "skip", *self._window_args(),
        )
        return [_begun(claim, row) for claim, row in zip(claims, rows, strict=True)]

    async def _finish(
        self, claim: Claim, burst: Burst, status: str, *, error: str | None = None, parts_sent: int | None = None,
        prompt: str | None = None, reply: str | None = None, agent_started_at: datetime | None = None,
        consume: bool = True,
    ) -> float | None:
        finish = _Finish(claim, burst.id, status, error, parts_sent, prompt, reply, agent_started_at, consume)
        wait = await self.finish_batches.submit(finish)
        assert not isinstance(wait, LeaseLost)
        return wait

    async def _finish_many(self, items: list[_Finish]) -> list[float | LeaseLost | None]:
        rows = await self._fetch_batch(
            FINISH_BURSTS, *_claim_columns([f.claim for f in items]), [f.burst_id for f in items],
            [f.status for f in items], [f.error for f in items], [f.parts_sent for f in items],
            [f.prompt for f in items], [f.reply for f in items], [f.agent_started_at for f in items],
            [f.consume for f in items], *self._window_args(),
        )
        return [row["wait_seconds"] if row["held"] else _lost(f.claim) for f, row in zip(items, rows, strict=True)]

    async def mark_sending(self, claim: Claim, burst: Burst, part: int, reply: RecordedReply | None = None) -> bool:
        """Before part `part` goes to WATI: extend the lease, record the reply (if new), mark the part in flight.

        Returns False, marking nothing, when the customer's newest message is outside the session window.
        """
        may_send = await self.mark_batches.submit(_Mark(claim, burst.id, part, reply))
        assert not isinstance(may_send, LeaseLost)
        return may_send

    async def _mark_many(self, items: list[_Mark]) -> list[bool | LeaseLost]:
        replies = [m.reply for m in items]
        rows = await self._fetch_batch(
            MARK_SENDINGS, *_claim_columns([m.claim for m in items]), [m.burst_id for m in items],
            [m.part for m in items], [r.prompt if r else None for r in replies],
            [r.text if r else None for r in replies], [r.parts if r else None for r in replies],
            [r.agent_started_at if r else None for r in replies],
            self.settings.lease_seconds, self.settings.session_window_hours * 3600,
        )
        return [bool(row["may_send"]) if row["held"] else _lost(m.claim) for m, row in zip(items, rows, strict=True)]

    async def mark_part_sent(self, claim: Claim, burst: Burst, part: int) -> None:
        """WATI accepted part `part` (not the last one: `complete` records that)."""
        if await self._fetchrow(MARK_PART_SENT, *self._claim_args(claim), burst.id, part) is None:
            raise _lost(claim)

    async def clear_sending(self, claim: Claim, burst: Burst) -> None:
        """WATI definitely did not accept the part in flight (refused before sending, or answered an error)."""
        if await self._fetchrow(CLEAR_SENDING, *self._claim_args(claim), burst.id) is None:
            raise _lost(claim)

    async def complete(
        self, claim: Claim, burst: Burst, status: str, *, parts_sent: int | None = None,
        reply: RecordedReply | None = None,
    ) -> float | None:
        """Finish the burst (`sent` with its parts, or `no_reply`): consume its messages, release the claim,
        schedule the buffer. One round trip."""
        return await self._finish(
            claim, burst, status, parts_sent=parts_sent, prompt=reply.prompt if reply else None,
            agent_started_at=reply.agent_started_at if reply else None,
        )

    async def give_up(self, claim: Claim, burst: Burst, status: str, error: str) -> float | None:
        """Close the burst as `dead`, `attention` or `expired` with the reason; its messages leave the buffer."""
        return await self._finish(claim, burst, status, error=error)

    async def has_newer_messages(self, claim: Claim, burst: Burst) -> bool:
        """Whether messages not in `burst` are buffered for its conversation (they arrived after the claim)."""
        async with connection(self.pool, self.timeout) as conn:
            return bool(await conn.fetchval(NEWER_MESSAGES, claim.channel, claim.customer,
                                            [message.id for message in burst.messages]))

    async def supersede(self, claim: Claim, burst: Burst, reply: RecordedReply) -> float | None:
        """Discard the unsent reply; the burst's messages stay buffered and join the next, larger burst."""
        return await self._finish(
            claim, burst, "superseded", consume=False, prompt=reply.prompt, reply=reply.text,
            agent_started_at=reply.agent_started_at,
            error="newer messages arrived before the reply was sent: the next burst answers them all",
        )

    async def retry_later(self, claim: Claim, burst: Burst, error: str, delay: float) -> None:
        """Release the claim with the conversation due again in `delay` seconds; the burst keeps its state."""
        row = await self._fetchrow(RELEASE_FOR_LATER, *self._claim_args(claim), burst.id, delay,
                                       burst.attempts, error, 0)
        if row is None:
            raise _lost(claim)

    async def hand_back(self, claim: Claim, burst: Burst | None) -> None:
        """Release a claim at shutdown so another worker takes it at once; the attempt does not count."""
        row = await self._fetchrow(RELEASE_FOR_LATER, *self._claim_args(claim), burst.id if burst else None,
                                       0.0, 0, None, 1)
        if row is None:
            raise _lost(claim)

    async def history(self, claim: Claim, burst: Burst, turns: int, chars: int) -> list[tuple[str, str]]:
        """Up to `turns` earlier (prompt, reply) pairs of the conversation, oldest first, within `chars` in all."""
        if turns <= 0:
            return []
        async with connection(self.pool, self.timeout) as conn:
            rows = await conn.fetch(HISTORY, claim.channel, claim.customer, burst.id, turns)
        kept: list[tuple[str, str]] = []
        budget = chars
        for row in rows:
            budget -= len(row["prompt"]) + len(row["reply"])
            if budget < 0:
                break
            kept.append((row["prompt"], row["reply"]))
        return kept[::-1]

    # -- operators --

    async def status(self) -> dict[str, Any]:
        """Counts for `watibot status` and `/readyz`."""
        async with connection(self.pool, self.timeout) as conn:
            row = await conn.fetchrow(STATUS)
        assert row is not None
        return dict(row)

    async def schema_revision(self) -> str | None:
        """The alembic revision the database is at."""
        async with connection(self.pool, self.timeout) as conn:
            return await conn.fetchval(SCHEMA_REVISION)  # type: ignore[no-any-return]

    async def schema_problem(self) -> str | None:
        """Why this code must not run on the database's schema (db.compatibility_problem), or None."""
        problems = await self.readiness_problems(writable=False)
        return problems[0] if problems else None

    async def readiness_problems(self, *, writable: bool = True) -> list[str]:
        """What keeps this worker from serving: a schema that does not serve this code and, with `writable`, a
        database that takes no writes (a standby before its promotion)."""
        async with connection(self.pool, self.timeout) as conn:
            row = await conn.fetchrow(SCHEMA_COMPATIBILITY)
            assert row is not None
            rows = {}
            if row["declared"]:
                rows = {r["revision"]: (r["position"], r["oldest_code_revision"])
                        for r in await conn.fetch(COMPATIBILITY_ROWS)}
        problems = []
        if problem := compatibility_problem(SCHEMA_REVISION_OF_CODE, row["revision"], rows):
            problems.append(problem)
        if writable and row["read_only"]:
            problems.append("database is read-only (a standby, or default_transaction_read_only): "
                            "webhooks are refused until it takes writes")
        return problems

    async def get_or_create_secret(self, name: str, candidate: str) -> str:
        """Return the stored secret `name`, storing `candidate` first if there is none."""
        async with connection(self.pool, self.timeout) as conn:
            value = await conn.fetchval(GET_OR_CREATE_GENERATED, name, candidate)
        assert isinstance(value, str)
        return value


# == operators ====================================================================================================
# Statements behind `watibot status / conversation / dead / replay / prune` and `/metrics`. They read the views of
# migration 0003 where one exists, so psql, the CLI and Prometheus agree on what "overdue" or "dead" means.

HEALTH = "SELECT * FROM watibot.health"

WORKERS_IN_FLIGHT = """
SELECT owner, count(*) AS held, min(lease_left_seconds)::float8 AS worst_lease_left_seconds,
       count(*) FILTER (WHERE lease_expired) AS expired
FROM watibot.in_flight
GROUP BY owner
ORDER BY owner
"""

# Counters and histograms for /metrics, computed from finished bursts (immutable once finished; a replay only
# changes status, and outcome reads replayed_from first) plus the totals of pruned bursts, so they only grow.
# One scan: GROUPING SETS aggregates outcome, replay and both histograms' buckets together.
BURST_TOTALS = """
WITH live AS (
    SELECT CASE WHEN GROUPING(outcome) = 0 THEN 'outcome'
                WHEN GROUPING(replayed) = 0 THEN 'replayed'
                WHEN GROUPING(claim_lag_le) = 0 THEN 'claim_lag'
                ELSE 'agent_seconds' END AS series,
           COALESCE(outcome, replayed::text, claim_lag_le, agent_le) AS label,
           count(*) AS count,
           COALESCE(CASE WHEN GROUPING(claim_lag_le) = 0 THEN sum(claim_lag_seconds)
                         WHEN GROUPING(agent_le) = 0 THEN sum(agent_seconds) END, 0) AS sum
    FROM watibot.finished_burst_facts
    GROUP BY GROUPING SETS ((outcome), (replayed), (claim_lag_le), (agent_le))
)
SELECT series, label, sum(count)::bigint AS count, sum(sum)::float8 AS sum
FROM (
    SELECT series, label, count, sum FROM live WHERE label IS NOT NULL AND label <> 'false'
    UNION ALL
    SELECT series, label, count, sum FROM watibot.pruned_burst_totals
) AS totals
GROUP BY series, label
"""

CONVERSATIONS_OF_CUSTOMER = """
SELECT channel, customer, wa_id, due_at, claimed_by, lease_expires_at, attempts, last_error
FROM watibot.conversation
WHERE customer = $1 OR wa_id = $1
ORDER BY channel, customer
"""

CONVERSATION_MESSAGES = """
SELECT id, received_at, type, text, burst_id
FROM watibot.message
WHERE channel = $1 AND customer = $2
ORDER BY received_at, id
"""

CONVERSATION_BURSTS = """
SELECT id, status, replayed_from, attempts, cardinality(message_ids) AS messages, prompt, reply, error,
       created_at, sent_at, finished_at
FROM watibot.burst
WHERE channel = $1 AND customer = $2
ORDER BY id
"""

DEAD_BURSTS = """
SELECT burst_id, channel, customer, status, reason, attempts, messages, finished_at
FROM watibot.dead
LIMIT $1
"""

BURST_CONVERSATION = "SELECT channel, customer FROM watibot.burst WHERE id = $1"

# Replay locks the conversation before the burst, in the order every fenced write does, so it cannot deadlock
# with a worker completing a burst of the same conversation.
LOCK_CONVERSATION = """
SELECT claimed_by FROM watibot.conversation WHERE channel = $1 AND customer = $2 FOR UPDATE
"""

LOCK_BURST = "SELECT status, sent_at, parts_sent, sending_part FROM watibot.burst WHERE id = $1 FOR UPDATE"

UNCONSUME_MESSAGES = "UPDATE watibot.message SET burst_id = NULL WHERE burst_id = $1"

MARK_REPLAYED = """
UPDATE watibot.burst SET status = 'replayed', replayed_from = status WHERE id = $1
"""

# A claimed conversation is left alone: its completion schedules whatever is buffered, the replayed messages too.
SCHEDULE_REPLAY = """
UPDATE watibot.conversation SET
    due_at = now(), buffer_started_at = COALESCE(buffer_started_at, now()), updated_at = now()
WHERE channel = $1 AND customer = $2 AND claimed_by IS NULL
"""

# One batch of `watibot prune`: the oldest finished bursts before the cutoff, their consumed messages, and their
# totals folded into pruned_burst_totals (same grouping as BURST_TOTALS) so metrics keep counting them. Every
# part of the statement sees the rows before the deletes. SKIP LOCKED: a burst being replayed is left for later.
# Buffered messages (burst_id NULL) and open bursts (finished_at NULL) are never selected; $2 lists statuses to
# keep whatever their age (open ones always; dead and attention unless --include-dead), so an outcome added
# later is pruned like sent.
PRUNE_BATCH = """
WITH doomed AS (
    SELECT id FROM watibot.burst
    WHERE finished_at < $1 AND status <> ALL($2::text[])
    ORDER BY finished_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), totals AS (
    SELECT CASE WHEN GROUPING(outcome) = 0 THEN 'outcome'
                WHEN GROUPING(replayed) = 0 THEN 'replayed'
                WHEN GROUPING(claim_lag_le) = 0 THEN 'claim_lag'
                ELSE 'agent_seconds' END AS series,
           COALESCE(outcome, replayed::text, claim_lag_le, agent_le) AS label,
           count(*) AS count,
           COALESCE(CASE WHEN GROUPING(claim_lag_le) = 0 THEN sum(claim_lag_seconds)
                         WHEN GROUPING(agent_le) = 0 THEN sum(agent_seconds) END, 0) AS sum
    FROM watibot.finished_burst_facts JOIN doomed ON doomed.id = finished_burst_facts.burst_id
    GROUP BY GROUPING SETS ((outcome), (replayed), (claim_lag_le), (agent_le))
), folded AS (
    INSERT INTO watibot.pruned_burst_totals AS t (series, label, count, sum)
    SELECT series, label, count, sum FROM totals WHERE label IS NOT NULL AND label <> 'false'
    ON CONFLICT (series, label) DO UPDATE SET count = t.count + EXCLUDED.count, sum = t.sum + EXCLUDED.sum
), messages AS (
    DELETE FROM watibot.message AS m USING doomed WHERE m.burst_id = doomed.id RETURNING m.id
), bursts AS (
    DELETE FROM watibot.burst AS b USING doomed WHERE b.id = doomed.id RETURNING b.id
)
SELECT (SELECT count(*) FROM bursts) AS bursts, (SELECT count(*) FROM messages) AS messages
"""

DATABASE_NOW = "SELECT now()"

VERSION_TABLE_EXISTS = "SELECT to_regclass('watibot.alembic_version') IS NOT NULL"


class ReplayRefused(Exception):
    """The burst cannot be replayed (unknown, or not dead/attention); the message says why."""


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What `replay` did."""

    burst_id: int
    channel: str
    customer: str
    replayed_from: str
    messages: int
    due_now: bool  # False: the conversation is claimed; its completion picks the messages up


@dataclass(frozen=True, slots=True)
class ConversationStory:
    """One conversation's row, messages and bursts, for `watibot conversation`."""

    conversation: dict[str, Any]
    messages: list[dict[str, Any]]
    bursts: list[dict[str, Any]]


OPEN_STATUSES = ("processing", "sending", "retry")
PROBLEM_STATUSES = ("dead", "attention")


class OperatorRepository(Repository):
    """Read-mostly operations for operators: health, histories, replay, pruning and metric totals."""

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
        """The health row and the burst totals read from one snapshot, so that a scrape is self-consistent."""
        async with connection(self.pool, self.timeout) as conn, conn.transaction(
            isolation="repeatable_read", readonly=True
        ):
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
        """Put a dead or attention burst's messages back in the buffer and make its conversation due now.

        A burst whose reply WATI accepted (in part or whole), or whose send has an unknown outcome, may have
        reached the customer: replaying it answers them again, so that takes `force`.
        """
        async with connection(self.pool, self.timeout) as conn, conn.transaction():
            target = await conn.fetchrow(BURST_CONVERSATION, burst_id)
            if target is None:
                raise ReplayRefused(f"burst {burst_id} does not exist")
            key = (target["channel"], target["customer"])
            claimed_by = await conn.fetchval(LOCK_CONVERSATION, *key)
            burst = await conn.fetchrow(LOCK_BURST, burst_id)
            status = burst["status"]
            if status not in PROBLEM_STATUSES:
                raise ReplayRefused(f"burst {burst_id} is {status}: only dead or attention bursts can be replayed")
            if not force and (burst["sent_at"] is not None or burst["parts_sent"] > 0):
                raise ReplayRefused(
                    f"burst {burst_id} ({status}): WATI accepted its reply ({burst['parts_sent'] or 'all'} part(s), "
                    f"{burst['sent_at'] or 'time not recorded'}); a replay sends the customer another answer. "
                    "Check `watibot conversation`, then use --force to replay anyway")
            if not force and burst["sending_part"] is not None:
                raise ReplayRefused(
                    f"burst {burst_id} ({status}): its send's outcome is unknown, it may have reached the customer; "
                    "a replay may answer them twice. Check WATI's message history, then use --force")
            moved = await conn.execute(UNCONSUME_MESSAGES, burst_id)
            await conn.execute(MARK_REPLAYED, burst_id)
            await conn.execute(SCHEDULE_REPLAY, *key)
        return ReplayResult(burst_id, key[0], key[1], status, int(moved.split()[-1]), claimed_by is None)

    async def prune_batch(self, cutoff: datetime, keep: Sequence[str], batch: int) -> tuple[int, int]:
        """Delete one batch of bursts finished before `cutoff` (except those in a `keep` status) and their
        messages: returns (bursts, messages)."""
        async with connection(self.pool, self.timeout) as conn:
            row = await conn.fetchrow(PRUNE_BATCH, cutoff, [*OPEN_STATUSES, *keep], batch)
        assert row is not None
        return int(row["bursts"]), int(row["messages"])

    async def migrated_revision(self) -> str | None:
        """The alembic revision, or None on a database that was never migrated."""
        async with connection(self.pool, self.timeout) as conn:
            if not await conn.fetchval(VERSION_TABLE_EXISTS):
                return None
        return await self.schema_revision()

    async def database_now(self) -> datetime:
        """The database clock (cutoffs are measured on it, like every other time)."""
        async with connection(self.pool, self.timeout) as conn:
            value = await conn.fetchval(DATABASE_NOW)
        assert isinstance(value, datetime)
        return value
