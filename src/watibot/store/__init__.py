"""Every SQL statement watibot runs, by concern; nothing else holds SQL (the schema is migrations/schema.sql).

- `ingest`: webhook writes (customer messages, operator pauses, delivery reports), batched;
- `claims`: the sweeper's claims, leases and timing;
- `bursts`: a claim holder's steps through a burst, batched, each a call of a transition function;
- `operators`: what the operator commands and /metrics read (replay and prune write), never batched;
- `sends`: around a WATI send, outside the burst's transitions: WATI's returned ids, the check before a resend;
- `instance`: schema compatibility, readiness, the database clock, generated secrets.

Times come from the database clock (`now()`), so several hosts with skewed clocks agree on due times and leases.
`Stores` wires one of each over a pool; the app factory builds it and hands each part to what needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from watibot.settings import Settings
from watibot.store.bursts import BurstStore
from watibot.store.claims import ClaimStore
from watibot.store.ingest import IngestStore
from watibot.store.instance import InstanceStore
from watibot.store.operators import OperatorStore
from watibot.store.sends import SendStore


@dataclass(frozen=True, slots=True)
class Stores:
    """The stores of one pool."""

    pool: asyncpg.Pool
    ingest: IngestStore
    claims: ClaimStore
    bursts: BurstStore
    operators: OperatorStore
    instance: InstanceStore
    sends: SendStore

    @classmethod
    def over(cls, pool: asyncpg.Pool, settings: Settings, reserved: asyncpg.Pool | None = None) -> Stores:
        """One store of each concern. With `reserved`, webhooks, claims, heartbeats and readiness use it and
        bursts and operators use `pool`: a worker busy with bursts still takes webhooks and keeps its leases."""
        control = reserved or pool
        return cls(pool, IngestStore(control, settings), ClaimStore(control, settings), BurstStore(pool, settings),
                   OperatorStore(pool, settings), InstanceStore(control, settings), SendStore(pool, settings))


__all__ = ["BurstStore", "ClaimStore", "IngestStore", "InstanceStore", "OperatorStore", "SendStore", "Stores"]
