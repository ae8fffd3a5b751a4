"""Claims: the sweeper takes due conversations, keeps their leases, and learns when to look again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from watibot.db import connection
from watibot.settings import Settings
from watibot.store.records import Claim

# One statement claims a batch:
# - `due_at <= now()` ORDER BY due_at is served by the partial index conversation_due_idx (idle rows are not in it);
# - a claimed row's due_at is its lease expiry, so an expired lease is simply due again: takeover needs no
#   second predicate;
# - SKIP LOCKED lets N claimers run at once without waiting on each other or on a webhook holding a row;
# - the fence is incremented so the previous holder's writes fail from now on;
# - last_position is the end of the burst: what arrives after the claim waits for the next one.
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
RETURNING c.channel, c.customer, c.wa_id, c.fence, due.previous_owner, due.was_due_at, c.claimed_at,
          c.last_position
"""

NEXT_DUE = """
SELECT (SELECT min(due_at) FROM watibot.conversation WHERE due_at IS NOT NULL) - now() AS wait
"""

# The rows are locked first, in key byte order (ORDER BY is applied before the locking clause), as every batch
# locks them.
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


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value.total_seconds())


class ClaimStore:
    """The sweeper's statements."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.timeout = settings.db_timeout_seconds

    async def claim_due(self, owner: str, limit: int) -> list[Claim]:
        """Claim up to `limit` due conversations (free, or with an expired lease) for `owner`."""
        async with connection(self.pool, self.timeout) as conn:
            rows = await conn.fetch(CLAIM_DUE, limit, owner, self.settings.lease_seconds)
        return [
            Claim(row["channel"], row["customer"], row["wa_id"], row["fence"], owner, row["previous_owner"],
                  row["was_due_at"], row["claimed_at"], row["last_position"])
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
