"""What the stores hand to the pipeline, the sweeper and the operator commands: plain frozen records."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any


class BurstStatus(enum.StrEnum):
    """A burst's status (the table's CHECK constraint lists the same; tests/test_schema.py compares them).

    The transitions between them are the functions of migrations/schema.sql, under "The burst's life".
    """

    PROCESSING = "processing"  # the agent is working on it
    SENDING = "sending"  # the reply is recorded, parts are going out
    RETRY = "retry"  # waiting to retry after a failure (or handed back at a stop)
    SENT = "sent"
    NO_REPLY = "no_reply"  # the agent chose silence
    DEAD = "dead"  # gave up: see error
    ATTENTION = "attention"  # a send with an unknown outcome, or a failed delivery: a human decides
    REPLAYED = "replayed"  # `watibot replay` answered its messages again in a new burst
    SUPERSEDED = "superseded"  # newer messages (or an operator) came first: reply not sent, messages kept
    EXPIRED = "expired"  # outside WhatsApp's session window: not sent
    HUMAN = "human"  # answered by an operator

    @property
    def open(self) -> bool:
        """Still in progress: the conversation's open burst."""
        return self in OPEN_STATUSES

    @property
    def consumes(self) -> bool:
        """Closing with this status answered the burst's messages (SQL: watibot.consumes)."""
        return self in CONSUMING_STATUSES


OPEN_STATUSES = frozenset({BurstStatus.PROCESSING, BurstStatus.SENDING, BurstStatus.RETRY})
CONSUMING_STATUSES = frozenset({BurstStatus.SENT, BurstStatus.NO_REPLY, BurstStatus.HUMAN, BurstStatus.DEAD,
                                BurstStatus.ATTENTION, BurstStatus.EXPIRED})
PROBLEM_STATUSES = (BurstStatus.DEAD.value, BurstStatus.ATTENTION.value)


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What storing one webhook message did."""

    duplicate: bool
    wait_seconds: float | None  # seconds from now until the conversation is due, when it was pushed


@dataclass(frozen=True, slots=True)
class Claim:
    """A conversation this worker holds, fenced by `fence`, with its messages up to `through` to answer."""

    channel: str
    customer: str
    wa_id: str | None
    fence: int
    owner: str
    previous_owner: str | None
    was_due_at: datetime | None
    claimed_at: datetime | None = None  # the database clock at the claim
    through: int = 0  # the conversation's last message position at the claim: the burst ends there
    claimed_monotonic: float = field(default_factory=time.monotonic)  # this host's monotonic clock then
    # the fresh burst the claim began in the same statement (watibot.claim_due); not part of the claim's identity
    begun: Burst | None = field(default=None, compare=False, hash=False)

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
    """A step found nothing (more) to do: the claim was released (wait = seconds until due again)."""

    reason: str
    wait_seconds: float | None


@dataclass(frozen=True, slots=True)
class RecordedReply:
    """The agent's answer, kept with the burst before anything is sent."""

    prompt: str
    text: str
    parts: int
    agent_started_at: datetime


class ReplayRefused(Exception):
    """The burst cannot be replayed; the message says why."""


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What `replay` did."""

    burst_id: int
    channel: str
    customer: str
    replayed_from: str
    messages: int
    due_now: bool  # False: the conversation is claimed; its holder picks the replay up when it releases it
    new_burst_id: int = 0


@dataclass(frozen=True, slots=True)
class ConversationStory:
    """One conversation's row, messages and bursts, for `watibot conversation`."""

    conversation: dict[str, Any]
    messages: list[dict[str, Any]]
    bursts: list[dict[str, Any]]
