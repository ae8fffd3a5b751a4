"""Claims: the sweeper takes due conversations, keeps their leases, and learns when to look again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from watibot.db import connection
from watibot.settings import Settings
from watibot.store.bursts import fresh_burst
from watibot.store.records import Claim

# One statement claims a batch and begins the fresh bursts among it (watibot.claim_due in migrations/schema.sql:
# FOR UPDATE SKIP LOCKED on due_at, a new fence, the lease; a buffer that is plainly the next burst is begun in the
# same update of the conversation row). The rest are begun by BurstStore.begin.
CLAIM_DUE = """
SELECT * FROM watibot.claim_due(p_limit => $1, p_owner => $2, p_lease => $3, p_skip_human => $4)
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
        """Claim up to `limit` due conversations (free, or with an expired lease) for `owner`; a claim whose
        fresh burst was begun with it carries that burst (`Claim.begun`)."""
        async with connection(self.pool, self.timeout) as conn:
            rows = await conn.fetch(CLAIM_DUE, limit, owner, self.settings.lease_seconds,
                                    self.settings.human_answered == "skip")
        return [
            Claim(row["channel"], row["customer"], row["wa_id"], row["fence"], owner, row["previous_owner"],
                  row["was_due_at"], row["claimed_at"], row["through"],
                  begun=None if row["burst_id"] is None else fresh_burst(row["burst_id"], row["messages"]))
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
