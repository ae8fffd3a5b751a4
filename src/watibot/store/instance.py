"""The database as a whole: its schema revision and compatibility, whether it takes writes, its clock, secrets."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from watibot.db import SCHEMA_REVISION as SCHEMA_REVISION_OF_CODE
from watibot.db import compatibility_problem, connection
from watibot.settings import Settings

SCHEMA_REVISION = "SELECT version_num FROM watibot.alembic_version"
VERSION_TABLE_EXISTS = "SELECT to_regclass('watibot.alembic_version') IS NOT NULL"

# The schema's revision and, since 0006, which code revisions each schema revision serves (db.compatibility_problem).
SCHEMA_COMPATIBILITY = """
SELECT (SELECT version_num FROM watibot.alembic_version) AS revision,
       to_regclass('watibot.schema_compatibility') IS NOT NULL AS declared,
       current_setting('transaction_read_only') = 'on' AS read_only
"""
COMPATIBILITY_ROWS = "SELECT revision, position, oldest_code_revision FROM watibot.schema_compatibility"

GET_OR_CREATE_GENERATED = """
WITH created AS (
    INSERT INTO watibot.instance_secret (name, value) VALUES ($1, $2)
    ON CONFLICT (name) DO NOTHING
    RETURNING value
)
SELECT value FROM created UNION ALL SELECT value FROM watibot.instance_secret WHERE name = $1
LIMIT 1
"""

DATABASE_NOW = "SELECT now()"


class InstanceStore:
    """Schema, readiness, clock and generated secrets."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.timeout = settings.db_timeout_seconds

    async def schema_revision(self) -> str | None:
        """The alembic revision the database is at."""
        async with connection(self.pool, self.timeout) as conn:
            return await conn.fetchval(SCHEMA_REVISION)  # type: ignore[no-any-return]

    async def migrated_revision(self) -> str | None:
        """The alembic revision, or None on a database that was never migrated."""
        async with connection(self.pool, self.timeout) as conn:
            if not await conn.fetchval(VERSION_TABLE_EXISTS):
                return None
        return await self.schema_revision()

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

    async def database_now(self) -> datetime:
        """The database clock (cutoffs are measured on it, like every other time)."""
        async with connection(self.pool, self.timeout) as conn:
            value = await conn.fetchval(DATABASE_NOW)
        assert isinstance(value, datetime)
        return value
