"""What a claim holder writes and checks around a WATI send, outside the burst's transitions: the ids WATI
returned (V3), and whether a part may be sent once more after WATI's history showed it absent."""

from __future__ import annotations

import asyncpg

from watibot.db import connection
from watibot.settings import Settings
from watibot.store.records import Claim

# The ids WATI's V3 API returned for one part we sent (its id, its own local_message_id). Written by the worker
# that sent it before the part's outcome is recorded, so a report arriving after that finds the burst.
RECORD_WATI_IDS = """
INSERT INTO watibot.wati_message (wati_message_id, burst_id, part)
SELECT id, $1, $2 FROM unnest($3::text[]) AS id
ON CONFLICT (wati_message_id) DO NOTHING
"""

# Seconds left on the lease of a conversation this worker still holds, with the burst's part still marked as in
# flight; NULL when anything changed (the claim was lost, the burst closed). A resend that ends before the lease
# does cannot race a taker: a conversation is taken over only once its lease has expired.
RESEND_LEASE_LEFT = """
SELECT EXTRACT(epoch FROM c.lease_expires_at - now())::float8
FROM watibot.conversation AS c
JOIN watibot.burst AS b ON b.id = c.open_burst_id
WHERE c.channel = $1 AND c.customer = $2 AND c.fence = $3 AND c.claimed_by = $4
  AND b.id = $5 AND b.status = 'sending' AND b.sending_part = $6
"""


class SendStore:
    """A claim holder's records and checks around one WATI send."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.timeout = settings.db_timeout_seconds

    async def record_wati_ids(self, burst_id: int, part: int, wati_ids: tuple[str, ...]) -> None:
        """Keep the ids WATI returned for a part we sent (V3), so that its reports and echoes find the burst."""
        async with connection(self.pool, self.timeout) as conn:
            await conn.execute(RECORD_WATI_IDS, burst_id, part, list(wati_ids))

    async def resend_lease_left(self, claim: Claim, burst_id: int, part: int) -> float | None:
        """Seconds left on this worker's lease with the part still marked in flight; None when the claim or the
        burst moved on (then the part must not be sent again)."""
        async with connection(self.pool, self.timeout) as conn:
            left = await conn.fetchval(RESEND_LEASE_LEFT, claim.channel, claim.customer, claim.fence, claim.owner,
                                       burst_id, part)
        return None if left is None else float(left)
