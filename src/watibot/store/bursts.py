"""The burst steps a claim holder takes, as calls of the transition functions in migrations/schema.sql.

What happens to a burst, and when, is read there ("The burst's life": the state diagram and one function per
transition). This module only calls them, with named parameters, and turns their outcomes into records. The claim
itself begins a fresh burst (`watibot.claim_due`, store/claims.py); begin (for the rest), mark and finish run through
`batching.Batcher`: the bursts of a worker that reach the same step together share one statement
(`watibot.begin_bursts` …, which lock their conversations in key order first) and one commit; `finish_bursts` closes
and releases the whole batch with one UPDATE each.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from watibot.batching import Batcher
from watibot.db import DatabaseUnavailable, LeaseLost, StatementFailed, connection
from watibot.settings import Settings
from watibot.store.records import BufferedMessage, Burst, BurstStatus, Claim, Closed, RecordedReply

BEGIN_BURSTS = """
SELECT * FROM watibot.begin_bursts(
    p_channels => $1, p_customers => $2, p_fences => $3, p_owners => $4, p_due_ats => $5, p_throughs => $6,
    p_max_attempts => $7, p_skip_human => $8, p_mode => $9, p_window => $10, p_max => $11)
"""

MARK_SENDINGS = """
SELECT * FROM watibot.mark_sendings(
    p_channels => $1, p_customers => $2, p_fences => $3, p_owners => $4, p_burst_ids => $5, p_parts => $6,
    p_not_afters => $7, p_prompts => $8, p_replies => $9, p_reply_parts => $10, p_agent_started_ats => $11,
    p_lease => $12, p_cover => $13, p_session_window => $14, p_mode => $15, p_window => $16, p_max => $17)
"""

FINISH_BURSTS = """
SELECT * FROM watibot.finish_bursts(
    p_channels => $1, p_customers => $2, p_fences => $3, p_owners => $4, p_burst_ids => $5, p_statuses => $6,
    p_errors => $7, p_parts_sent => $8, p_prompts => $9, p_replies => $10, p_agent_started_ats => $11,
    p_mode => $12, p_window => $13, p_max => $14)
"""

MARK_TEMPLATE = """
SELECT watibot.mark_template(
    p_channel => $1, p_customer => $2, p_fence => $3, p_owner => $4, p_burst_id => $5, p_not_after => $6,
    p_lease => $7, p_cover => $8, p_session_window => $9, p_template => $10, p_prompt => $11, p_reply => $12,
    p_reply_parts => $13, p_agent_started_at => $14)
"""

PART_SENT = """
SELECT watibot.part_sent(p_channel => $1, p_customer => $2, p_fence => $3, p_owner => $4, p_burst_id => $5,
                         p_part => $6)
"""

FAIL_BURST = """
SELECT * FROM watibot.fail_burst(
    p_channel => $1, p_customer => $2, p_fence => $3, p_owner => $4, p_burst_id => $5, p_error => $6,
    p_permanent => $7, p_retry_in => $8, p_max_attempts => $9, p_mode => $10, p_window => $11, p_max => $12)
"""

HAND_BACK = """
SELECT watibot.hand_back(p_channel => $1, p_customer => $2, p_fence => $3, p_owner => $4, p_burst_id => $5)
"""

# Supersede (discard an unsent reply because the customer wrote more) only while the buffer is younger than the
# window's maximum: a customer who keeps typing is still answered, at most WATIBOT_BUFFER_MAX_SECONDS late. Never
# a replayed burst (behind the high-water mark): the next burst would not include its messages.
SHOULD_SUPERSEDE = """
SELECT EXISTS (SELECT 1 FROM watibot.message AS m
               WHERE m.channel = c.channel AND m.customer = c.customer AND m.position > $3)
       AND (c.buffer_started_at IS NULL OR c.buffer_started_at > now() - make_interval(secs => $4))
       AND b.after_position >= c.answered_position
FROM watibot.conversation AS c
JOIN watibot.burst AS b ON b.id = c.open_burst_id
WHERE c.channel = $1 AND c.customer = $2
"""

# The customer's earlier answered bursts, newest first, for an agent's memory.
HISTORY = """
SELECT prompt, reply FROM watibot.burst
WHERE channel = $1 AND customer = $2 AND id < $3 AND status = 'sent' AND prompt IS NOT NULL AND reply IS NOT NULL
  AND template IS NULL
ORDER BY id DESC
LIMIT $4
"""


@dataclass(frozen=True, slots=True)
class _Mark:
    claim: Claim
    burst_id: int
    part: int
    reply: RecordedReply | None
    not_after: datetime


@dataclass(frozen=True, slots=True)
class _Finish:
    claim: Claim
    burst_id: int
    status: BurstStatus
    error: str | None
    parts_sent: int | None
    reply: RecordedReply | None
    record_text: bool  # record the reply's text too (superseded: kept for the record; no_reply: nothing said)


def _lost(claim: Claim) -> LeaseLost:
    """The error for a write refused because `claim`'s fence no longer matches."""
    return LeaseLost(f"conversation {claim.channel}/{claim.customer} fence {claim.fence}")


def _timestamp(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _claim_columns(claims: list[Claim]) -> tuple[list[str], list[str], list[int], list[str]]:
    return ([c.channel for c in claims], [c.customer for c in claims], [c.fence for c in claims],
            [c.owner for c in claims])


def _messages(items: list[dict[str, Any]]) -> list[BufferedMessage]:
    """A burst's messages from watibot.burst_messages' JSON."""
    return [
        BufferedMessage(
            id=item["id"], provider_message_id=item["provider_message_id"], type=item["type"],
            text=item["text"], wati_timestamp=_timestamp(item["wati_timestamp"]),
            received_at=_timestamp(item["received_at"]) or datetime.now(UTC), data=item["data"],
        )
        for item in items
    ]


def fresh_burst(burst_id: int, messages: list[dict[str, Any]]) -> Burst:
    """A burst begun by the claim itself (watibot.claim_due): first attempt, nothing said yet."""
    return Burst(burst_id, 1, _messages(messages), None, None, 0)


def _begun(claim: Claim, row: asyncpg.Record) -> Burst | Closed | LeaseLost:
    if row["outcome"] == "lost":
        return _lost(claim)
    if row["outcome"] != "run":
        return Closed(row["outcome"], row["wait_seconds"])
    return Burst(row["burst_id"], row["attempts"], _messages(row["messages"]), row["reply"], row["reply_parts"],
                 row["parts_sent"])


class BurstStore:
    """A claim holder's steps through a burst. Every step is fenced: a lost claim raises `LeaseLost`."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.timeout = settings.db_timeout_seconds
        t, server = self.timeout, (StatementFailed,)
        self.begin_batches: Batcher[Claim, Burst | Closed | LeaseLost] = Batcher(
            self._begin_many, timeout=t, rolled_back=server, name="begin")
        self.mark_batches: Batcher[_Mark, Closed | LeaseLost | DatabaseUnavailable | None] = Batcher(
            self._mark_many, timeout=t, rolled_back=server, name="mark")
        self.finish_batches: Batcher[_Finish, float | LeaseLost | None] = Batcher(
            self._finish_many, timeout=t, rolled_back=server, name="finish")

    def _window(self) -> tuple[str, float, float]:
        s = self.settings
        return s.buffer_mode.value, s.buffer_seconds, s.buffer_max_seconds

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with connection(self.pool, self.timeout) as conn:  # a Batcher bounds the whole wait
            return list(await conn.fetch(query, *args))

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record:
        rows = await self._fetch(query, *args)
        return rows[0]

    # -- begin --

    async def begin(self, claim: Claim) -> Burst | Closed:
        """Start (or resume) the conversation's burst under `claim`, or close what cannot go on
        (watibot.begin_burst: paused, attention, dead, empty). A claim that began its fresh burst itself
        (`Claim.begun`) needs no statement."""
        if claim.begun is not None:
            return claim.begun
        begun = await self.begin_batches.submit(claim)  # a refused fence raises LeaseLost
        assert not isinstance(begun, LeaseLost)
        return begun

    async def _begin_many(self, claims: list[Claim]) -> list[Burst | Closed | LeaseLost]:
        s = self.settings
        rows = await self._fetch(
            BEGIN_BURSTS, *_claim_columns(claims), [c.was_due_at for c in claims], [c.through for c in claims],
            s.max_attempts, s.human_answered == "skip", *self._window(),
        )
        return [_begun(claim, row) for claim, row in zip(claims, rows, strict=True)]

    # -- sending --

    async def mark_sending(self, claim: Claim, burst: Burst, part: int,
                           reply: RecordedReply | None = None) -> Closed | None:
        """Before part `part` goes to WATI: record the reply (if new) and mark the part in flight; None: send it.

        A `Closed` instead means nothing may be sent: the session window has closed (`expired`) or an operator
        wrote meanwhile (`paused`). Raises `DatabaseUnavailable` when the mark could not be made before this
        call's deadline: then it is certainly not made, and the part must not be sent.
        """
        margin = min(1.0, self.timeout / 4)  # the mark must commit before the caller stops waiting for it
        not_after = claim.database_now() + timedelta(seconds=self.timeout - margin)
        outcome = await self.mark_batches.submit(_Mark(claim, burst.id, part, reply, not_after))
        assert not isinstance(outcome, (LeaseLost, DatabaseUnavailable))
        return outcome

    async def _mark_many(self, items: list[_Mark]) -> list[Closed | LeaseLost | DatabaseUnavailable | None]:
        s = self.settings
        replies = [m.reply for m in items]
        rows = await self._fetch(
            MARK_SENDINGS, *_claim_columns([m.claim for m in items]), [m.burst_id for m in items],
            [m.part for m in items], [m.not_after for m in items], [r.prompt if r else None for r in replies],
            [r.text if r else None for r in replies], [r.parts if r else None for r in replies],
            [r.agent_started_at if r else None for r in replies],
            s.lease_seconds, s.wati_timeout_seconds + 2 * s.db_timeout_seconds, s.session_window_hours * 3600,
            *self._window(),
        )
        results: list[Closed | LeaseLost | DatabaseUnavailable | None] = []
        for mark, row in zip(items, rows, strict=True):
            match row["outcome"]:
                case "send":
                    results.append(None)
                case "lost":
                    results.append(_lost(mark.claim))
                case "late":
                    results.append(DatabaseUnavailable("the sending mark came after its deadline: not made"))
                case outcome:
                    results.append(Closed(outcome, row["wait_seconds"]))
        return results

    async def mark_template(self, claim: Claim, burst: Burst, template: str,
                            reply: RecordedReply | None = None) -> bool:
        """Before the first part, with WATIBOT_WINDOW_TEMPLATE set (watibot.mark_template): True when the customer's
        latest message is outside the session window and the burst is now marked sending `template` instead of
        the reply (the reply, if new, recorded); False when nothing was written and `mark_sending` decides as
        usual. Raises `LeaseLost`, or `DatabaseUnavailable` when the mark came after this call's deadline."""
        s = self.settings
        margin = min(1.0, self.timeout / 4)
        not_after = claim.database_now() + timedelta(seconds=self.timeout - margin)
        row = await self._fetchrow(
            MARK_TEMPLATE, claim.channel, claim.customer, claim.fence, claim.owner, burst.id, not_after,
            s.lease_seconds, s.wati_timeout_seconds + 2 * s.db_timeout_seconds, s.session_window_hours * 3600,
            template, reply.prompt if reply else None, reply.text if reply else None,
            reply.parts if reply else None, reply.agent_started_at if reply else None)
        match row[0]:
            case "send":
                return True
            case "reply":
                return False
            case "late":
                raise DatabaseUnavailable("the template mark came after its deadline: not made")
            case _:
                raise _lost(claim)

    async def part_sent(self, claim: Claim, burst: Burst, part: int) -> None:
        """WATI accepted part `part` (not the last one: `finish` records that)."""
        row = await self._fetchrow(PART_SENT, claim.channel, claim.customer, claim.fence, claim.owner, burst.id,
                                   part)
        if not row[0]:
            raise _lost(claim)

    # -- closing --

    async def finish(
        self, claim: Claim, burst: Burst, status: BurstStatus, *, error: str | None = None,
        parts_sent: int | None = None, reply: RecordedReply | None = None, record_text: bool = False,
    ) -> float | None:
        """Close the burst (sent, no_reply, superseded, dead, attention, expired; watibot.finish_bursts), release
        the claim and schedule the buffer. Returns seconds until the conversation is due again, or None."""
        wait = await self.finish_batches.submit(
            _Finish(claim, burst.id, status, error, parts_sent, reply, record_text))
        assert not isinstance(wait, LeaseLost)
        return wait

    async def _finish_many(self, items: list[_Finish]) -> list[float | LeaseLost | None]:
        replies = [f.reply for f in items]
        rows = await self._fetch(
            FINISH_BURSTS, *_claim_columns([f.claim for f in items]), [f.burst_id for f in items],
            [f.status.value for f in items], [f.error for f in items], [f.parts_sent for f in items],
            [r.prompt if r else None for r in replies],
            [r.text if r and f.record_text else None for f, r in zip(items, replies, strict=True)],
            [r.agent_started_at if r else None for r in replies], *self._window(),
        )
        return [row["wait_seconds"] if row["held"] else _lost(f.claim) for f, row in zip(items, rows, strict=True)]

    async def fail(self, claim: Claim, burst: Burst, error: str, *, permanent: bool, retry_in: float) -> Closed:
        """The agent or WATI failed (nothing in flight): `retry` in `retry_in` seconds, or `dead` when the error
        is permanent or the attempts are used (watibot.fail_burst decides)."""
        s = self.settings
        row = await self._fetchrow(FAIL_BURST, claim.channel, claim.customer, claim.fence, claim.owner, burst.id,
                                   error, permanent, retry_in, s.max_attempts, *self._window())
        if row["outcome"] == "lost":
            raise _lost(claim)
        return Closed(row["outcome"], row["wait_seconds"])

    async def hand_back(self, claim: Claim, burst: Burst | None) -> None:
        """Release a claim at shutdown so another worker takes it at once; the attempt does not count."""
        row = await self._fetchrow(HAND_BACK, claim.channel, claim.customer, claim.fence, claim.owner,
                                   burst.id if burst else None)
        if not row[0]:
            raise _lost(claim)

    # -- reading --

    async def should_supersede(self, claim: Claim) -> bool:
        """Whether messages arrived after the claim and the buffer is still younger than its maximum."""
        rows = await self._fetch(SHOULD_SUPERSEDE, claim.channel, claim.customer, claim.through,
                                 self.settings.buffer_max_seconds)
        return bool(rows and rows[0][0])

    async def history(self, claim: Claim, burst: Burst, turns: int, chars: int) -> list[tuple[str, str]]:
        """Up to `turns` earlier (prompt, reply) pairs of the conversation, oldest first, within `chars` in all."""
        if turns <= 0:
            return []
        rows = await self._fetch(HISTORY, claim.channel, claim.customer, burst.id, turns)
        kept: list[tuple[str, str]] = []
        budget = chars
        for row in rows:
            budget -= len(row["prompt"]) + len(row["reply"])
            if budget < 0:
                break
            kept.append((row["prompt"], row["reply"]))
        return kept[::-1]
