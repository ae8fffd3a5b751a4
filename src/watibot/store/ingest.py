"""Webhook writes: customer messages into the buffer, operator messages (pause), WATI's delivery reports."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from watibot.batching import Batcher
from watibot.db import StatementFailed, connection
from watibot.payload import CustomerMessage, DeliveryUpdate, OperatorMessage
from watibot.settings import Settings
from watibot.store.records import IngestResult

# One statement, one round trip, one commit for a batch of webhooks (see batching.py): store each message once,
# at the next position of its conversation, and push the conversation's timer.
# - Positions come from the conversation row's counter (last_position), advanced by the upsert that locks the
#   row, in the same statement as the insert: positions grow in commit order, so a burst "up to position P" read
#   under that lock never skips a message committed later with a smaller position (a global sequence would).
# - A delivery stored before (WATI retries) is filtered out first and touches nothing; one racing in another
#   batch is caught by ON CONFLICT and leaves a gap in the positions (harmless: bursts are ranges).
# - While a conversation is claimed its due_at is the lease expiry; the holder's release schedules the buffer.
#   Otherwise the window rule (watibot.buffer_due) moves it, never earlier. EXCLUDED.updated_at carries the
#   batch's latest arrival for that rule.
# - Conversations are upserted in key byte order, the order in which every batch and the heartbeat lock them.
# The caller passes each whatsappMessageId at most once per batch.
INGEST_MESSAGES = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::timestamptz[], $8::text[], $9::text[], $10::timestamptz[])
        WITH ORDINALITY AS i(channel, customer, provider_message_id, wati_id, type, text, wati_timestamp,
                             payload, wa_id, arrived_at, position)
), fresh AS (
    SELECT input.*, COALESCE(input.arrived_at, now()) AS received_at,
           row_number() OVER (PARTITION BY input.channel, input.customer ORDER BY input.position) AS rank
    FROM input
    WHERE NOT EXISTS (SELECT 1 FROM watibot.message AS m WHERE m.provider_message_id = input.provider_message_id)
), arrived AS (
    SELECT channel, customer, count(*) AS n, min(received_at) AS first_at, max(received_at) AS last_at,
           max(LEAST(received_at, COALESCE(wati_timestamp, received_at))) AS customer_at,
           (array_agg(wa_id ORDER BY position DESC) FILTER (WHERE wa_id IS NOT NULL))[1] AS wa_id
    FROM fresh
    GROUP BY channel, customer
), pushed AS (
    INSERT INTO watibot.conversation AS c (channel, customer, wa_id, due_at, buffer_started_at, last_position,
                                           last_customer_message_at, updated_at)
    SELECT channel, customer, wa_id,
           watibot.buffer_due(p_first => first_at, p_last => last_at, p_mode => $12, p_window => $11, p_max => $13),
           first_at, n, customer_at, last_at
    FROM arrived
    ORDER BY channel COLLATE "C", customer COLLATE "C"
    ON CONFLICT (channel, customer) DO UPDATE SET
        wa_id = COALESCE(EXCLUDED.wa_id, c.wa_id),
        last_position = c.last_position + EXCLUDED.last_position,
        last_customer_message_at = GREATEST(c.last_customer_message_at, EXCLUDED.last_customer_message_at),
        due_at = CASE
            WHEN c.claimed_by IS NOT NULL THEN c.due_at
            WHEN c.due_at IS NULL THEN EXCLUDED.due_at
            ELSE GREATEST(c.due_at, watibot.buffer_due(p_first => c.buffer_started_at, p_last => EXCLUDED.updated_at,
                                                       p_mode => $12, p_window => $11, p_max => $13))
        END,
        buffer_started_at = CASE
            WHEN c.claimed_by IS NULL AND c.due_at IS NULL THEN EXCLUDED.buffer_started_at
            ELSE c.buffer_started_at
        END,
        updated_at = now()
    RETURNING c.channel, c.customer, c.due_at, c.last_position
), new_message AS (
    INSERT INTO watibot.message (channel, customer, position, provider_message_id, wati_id, type, text,
                                 wati_timestamp, payload, received_at)
    SELECT f.channel, f.customer, p.last_position - a.n + f.rank, f.provider_message_id, f.wati_id, f.type, f.text,
           f.wati_timestamp, f.payload::jsonb, f.received_at
    FROM fresh AS f
    JOIN arrived AS a ON a.channel = f.channel AND a.customer = f.customer
    JOIN pushed AS p ON p.channel = f.channel AND p.customer = f.customer
    ORDER BY f.provider_message_id COLLATE "C"
    ON CONFLICT (provider_message_id) DO NOTHING
    RETURNING id, provider_message_id, received_at
)
SELECT new_message.id AS message_id, new_message.received_at, pushed.due_at
FROM input
LEFT JOIN new_message USING (provider_message_id)
LEFT JOIN pushed ON pushed.channel = input.channel AND pushed.customer = input.customer
ORDER BY input.position
"""

# An operator wrote to the customer: pause the bot for the conversation, and count the messages stored so far
# as answered by a human (human_position). A conversation that is buffering is pushed to the end of the pause; a
# claimed one finds the pause when it begins a burst or marks its first part. Our own replies come back as
# operator messages too ($5 names the burst, or for a V3 send one of $6 is an id WATI returned): they are ignored.
# A V3 echo can arrive before the sender has recorded WATI's ids: while the conversation's burst is sending, an
# echo whose text ($7) is part of that burst's reply is ours too.
OPERATOR_MESSAGE = """
INSERT INTO watibot.conversation AS c (channel, customer, wa_id, paused_until, human_message_at, human_position)
SELECT $1, $2, $3, now() + make_interval(secs => $4), now(), 0
WHERE NOT EXISTS (SELECT 1 FROM watibot.burst WHERE id = $5)
  AND NOT EXISTS (SELECT 1 FROM watibot.wati_message WHERE wati_message_id = ANY($6::text[]))
  AND NOT EXISTS (SELECT 1 FROM watibot.burst AS b
                  WHERE $7::text IS NOT NULL AND b.channel = $1 AND b.customer = $2 AND b.status = 'sending'
                    AND strpos(b.reply, $7) > 0)
ON CONFLICT (channel, customer) DO UPDATE SET
    paused_until = GREATEST(c.paused_until, EXCLUDED.paused_until),
    human_message_at = EXCLUDED.human_message_at,
    human_position = c.last_position,
    due_at = CASE WHEN c.claimed_by IS NULL AND c.due_at IS NOT NULL
                  THEN GREATEST(c.due_at, EXCLUDED.paused_until) ELSE c.due_at END,
    updated_at = now()
RETURNING 1
"""

# WATI's report on a reply we sent. A failed delivery is never re-sent automatically (WATI accepted the message
# once; a repeat could reach the customer twice, and 24-hour window failures cannot succeed): a sent burst goes
# to attention with the reason; one still sending its later parts does when it finishes (watibot.finish_bursts).
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
    error = CASE WHEN $2 = 'failed' AND b.status = 'sent'
                 THEN 'WhatsApp delivery failed after WATI accepted the reply: ' || COALESCE($3, '-')
                 ELSE b.error END
FROM watibot.conversation AS c
-- our localMessageId names the burst; a V3 send is found by the ids WATI returned for it
WHERE b.id = COALESCE($1::bigint, (SELECT m.burst_id FROM watibot.wati_message AS m
                                   WHERE m.wati_message_id = ANY($7::text[]) LIMIT 1))
  -- only the burst of the customer (and channel) the report names: anyone can post a localMessageId
  AND c.channel = b.channel AND c.customer = b.customer
  AND (c.customer = $4 OR c.wa_id = $5)
  AND ($6::text IS NULL OR b.channel = $6)
RETURNING b.id
"""


@dataclass(frozen=True, slots=True)
class _Ingest:
    message: CustomerMessage
    arrived_at: datetime | None


class IngestStore:
    """What `POST /webhook` writes."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.timeout = settings.db_timeout_seconds
        # Group commit (batching.py): one batch at a time per worker and, when busy with small batches, the next
        # one gathers for 1 ms: fewer, larger commits. PostgreSQL 15 here, wrk -c64, 2 runs each: 4 workers
        # 4.8-5.5 k/s and 5-7 webhooks per commit without it, 5.8-5.9 k/s and 9 per commit with it.
        self.batches: Batcher[_Ingest, IngestResult] = Batcher(
            self._ingest_many, timeout=self.timeout, rolled_back=(StatementFailed,), max_running=1, name="ingest",
            linger=0.001)

    async def ingest(self, message: CustomerMessage, arrived_at: datetime | None = None) -> IngestResult:
        """Store a customer message and push its conversation's due time; returns once that is committed.

        Concurrent calls share one statement and commit (group commit). `arrived_at` replaces the database
        clock for tests of the window rules; the service passes None. Raises `DatabaseUnavailable` within the
        database timeout: the sender gets a 503 in bounded time, never a hang.
        """
        return await self.batches.submit(_Ingest(message, arrived_at))

    async def _ingest_many(self, items: list[_Ingest]) -> list[IngestResult]:
        s = self.settings
        first: dict[str, int] = {}  # a whatsappMessageId twice in one batch: the second is a duplicate
        unique = [first.setdefault(item.message.provider_message_id, n) == n for n, item in enumerate(items)]
        batch = [item for item, keep in zip(items, unique, strict=True) if keep]
        messages = [item.message for item in batch]
        async with connection(self.pool, self.timeout) as conn:  # the Batcher bounds the whole wait
            rows = await conn.fetch(
                INGEST_MESSAGES,
                [m.channel for m in messages], [m.customer for m in messages],
                [m.provider_message_id for m in messages], [m.wati_id for m in messages], [m.type for m in messages],
                [m.text for m in messages], [m.wati_timestamp for m in messages],
                [json.dumps(m.payload) for m in messages], [m.wa_id for m in messages],
                [item.arrived_at for item in batch], s.buffer_seconds, s.buffer_mode.value, s.buffer_max_seconds,
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
                event.our_burst_id, list(event.wati_ids), event.text,
            )
        return row is not None

    async def delivery_update(self, event: DeliveryUpdate) -> bool:
        """Record WATI's delivery report on one of our bursts; False when no such burst exists."""
        async with connection(self.pool, self.timeout) as conn:
            row = await conn.fetchval(DELIVERY_UPDATE, event.burst_id, event.state, event.error, event.customer,
                                      event.wa_id, event.channel, list(event.wati_ids))
        return row is not None
