"""Connection pool, database URL resolution and the translation of driver errors.

The rest of the code never names `asyncpg` exceptions. Every driver or server error becomes one of watibot's
family, `DatabaseError`, at this boundary (`translate_errors`, which `connection()` applies):

- `DatabaseUnavailable`: not reachable, no answer in time, or not taking writes right now (a shutdown, too many
  connections, a read-only standby during a failover). An operation in flight may or may not have committed.
- `StatementFailed`: the server reported an error for the statement and rolled it back (a deadlock, a
  serialization failure, a function or column this code expects and the schema lacks, a value it refuses).

Both carry the SQLSTATE when the server gave one. A webhook answers 503 for either (nothing was stored); a
background loop logs it and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from watibot.embedded import EmbeddedCluster
from watibot.settings import Settings, load_settings

log = logging.getLogger("watibot.db")

SCHEMA_REVISION = "0011_window_template"


def compatibility_problem(code: str, schema: str | None, rows: dict[str, tuple[int, str]]) -> str | None:
    """Why code at revision `code` must not run on a schema at `schema`, or None when it may.

    `rows` is watibot.schema_compatibility (revision -> (position, oldest code revision served)); empty on a
    schema older than that table. Code may run on its own revision, and on a later one whose oldest served code
    revision is not after it (see migration 0006).
    """
    if schema == code:
        return None
    if schema is None:
        return f"the database schema is not migrated; this code needs {code}: run `watibot migrate`"
    here, at = rows.get(code), rows.get(schema)
    if here is None or at is None or at[0] < here[0]:
        return f"schema at {schema}, expected {code}: run `watibot migrate`"
    oldest = rows.get(at[1])
    if oldest is None or oldest[0] > here[0]:
        return (f"schema at {schema} serves code from {at[1]} on; this code is at {code}: "
                "upgrade it (the schema was contracted past it)")
    return None


class DatabaseError(Exception):
    """A database operation failed; `sqlstate` is the server's error code when it sent one."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached, did not answer in time, or does not take writes right now."""


class StatementFailed(DatabaseError):
    """The server refused a statement and rolled it back; nothing of it was committed."""


class LeaseLost(Exception):
    """A claim holder's fence no longer matches: another worker owns the conversation now."""


# "The server is not there right now", by SQLSTATE class where the server said so: 08 connection exception,
# 53 insufficient resources (too many connections), 57 operator intervention (shutdown, cannot connect now,
# statement timeout), 58 system error; and the client-side errors of a connection that broke mid-operation.
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.PostgresSystemError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


# Server errors that say "not now" rather than "not this statement": 25006 a read-only transaction (what a
# service meets when its DSN reaches a standby, before or during a failover).
_UNAVAILABLE_SQLSTATES = frozenset({"25006"})


def describe_error(error: BaseException) -> str:
    """`Type: message`, with the SQLSTATE when the error carries one (for logs)."""
    sqlstate = getattr(error, "sqlstate", None)
    text = f"{type(error).__name__}: {error}"
    return f"{text} (SQLSTATE {sqlstate})" if sqlstate and f"SQLSTATE {sqlstate}" not in text else text


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn every driver and server error into the `DatabaseError` family."""
    try:
        yield
    except DatabaseError:
        raise
    except _UNAVAILABLE as error:
        sqlstate = getattr(error, "sqlstate", None)
        raise DatabaseUnavailable(describe_error(error), sqlstate) from error
    except asyncpg.exceptions.PostgresError as error:
        sqlstate = getattr(error, "sqlstate", None)
        family = DatabaseUnavailable if sqlstate in _UNAVAILABLE_SQLSTATES else StatementFailed
        raise family(describe_error(error), sqlstate) from error


async def _init_connection(connection: asyncpg.Connection) -> None:
    await connection.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Pool reset on release: nothing to undo.

    asyncpg rolls back an open transaction before calling this; watibot sets no session state, holds no
    advisory locks, cursors or LISTENs, so the default reset (4 statements and a round trip per release) is
    pure cost: it was a sixth of a worker's time in the drain benchmark.
    """


# Of each worker's WATIBOT_DB_POOL_SIZE connections, this many are kept for webhooks, the claim loop and the
# heartbeat (store.Stores: ingest, claims, instance), so that bursts holding the rest never starve them.
RESERVED_CONNECTIONS = 2


async def create_pool(settings: Settings, url: str, size: int | None = None) -> asyncpg.Pool:
    """Open a pool of `size` connections (WATIBOT_DB_POOL_SIZE by default). Connections are made lazily, so this
    succeeds while the database is down."""
    pool = asyncpg.create_pool(
        url,
        min_size=0,
        max_size=size or settings.db_pool_size,
        timeout=settings.db_timeout_seconds,
        command_timeout=settings.db_timeout_seconds,
        init=_init_connection,
        reset=_keep_session,
        statement_cache_size=settings.db_statement_cache_size,
        server_settings={"application_name": "watibot"},
    )
    await pool
    return pool


@contextlib.asynccontextmanager
async def connection(pool: asyncpg.Pool, timeout: float) -> AsyncIterator[asyncpg.Connection]:  # noqa: ASYNC109
    """Acquire a pooled connection within `timeout`, translating driver errors."""
    with translate_errors():
        async with pool.acquire(timeout=timeout) as conn:
            yield conn


async def wait_for_database(url: str, timeout: float) -> None:  # noqa: ASYNC109 - a startup deadline, not a call timeout
    """Retry connecting with backoff until the database answers or `timeout` seconds pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.2
    while True:
        try:
            conn = await asyncpg.connect(url, timeout=min(5.0, max(0.5, deadline - loop.time())))
            await conn.close()
            return
        except (*_UNAVAILABLE, asyncpg.exceptions.InvalidCatalogNameError) as error:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DatabaseUnavailable(
                    f"database not reachable after {timeout:.0f} s ({type(error).__name__}: {error})"
                ) from error
            log.warning("database not reachable (%s); retrying in %.1f s", type(error).__name__, delay)
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    """What PostgreSQL can still accept: `free` = max_connections - reserved - in use (by others)."""

    max_connections: int
    reserved: int
    in_use: int

    @property
    def free(self) -> int:
        return max(0, self.max_connections - self.reserved - self.in_use)


CONNECTION_BUDGET = """
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int
         + COALESCE(NULLIF(current_setting('reserved_connections', true), '')::int, 0) AS reserved,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())
         AS in_use
"""


async def connection_budget(url: str, timeout: float) -> ConnectionBudget:  # noqa: ASYNC109 - a call timeout
    """Read the server's connection limits and use (one short connection)."""
    with translate_errors():
        conn = await asyncpg.connect(url, timeout=timeout, command_timeout=timeout, statement_cache_size=0)
        try:
            row = await conn.fetchrow(CONNECTION_BUDGET)
        finally:
            await conn.close()
    assert row is not None
    return ConnectionBudget(row["max_connections"], row["reserved"], row["in_use"])


def embedded_cluster(settings: Settings) -> EmbeddedCluster:
    """The embedded cluster that serves when no database URL is configured."""
    return EmbeddedCluster(Path(settings.data_dir))


def resolve_database_url(settings: Settings | None = None) -> str:
    """The configured DSN or, with none configured, the embedded server's (started if needed)."""
    settings = settings or load_settings()
    if settings.database_url:
        return settings.database_url
    cluster = embedded_cluster(settings)
    cluster.start()
    return cluster.url()


def sqlalchemy_url(url: str) -> str:
    """The same DSN spelled for SQLAlchemy's psycopg dialect (alembic only: it runs multi-statement SQL)."""
    _scheme, _, rest = url.partition("://")
    return f"postgresql+psycopg://{rest}"


def migrations_dir() -> Path:
    """The alembic script directory, in an installed wheel or a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "migrations", package.parents[1] / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError("alembic migrations not found next to the watibot package")


def alembic_config(url: str) -> Any:
    """An alembic `Config` pointed at our migrations and at `url`."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = url
    return config


class MigrationRefused(Exception):
    """`upgrade` was asked for a revision it does not know, or one older than the database's (a downgrade)."""


def current_revision(url: str) -> str | None:
    """The revision the database is at (None before the first migration), read the way alembic reads it."""
    import sqlalchemy
    from alembic.runtime.migration import MigrationContext

    engine = sqlalchemy.create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table_schema": "watibot"})
            return context.get_current_revision()
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision` (synchronously; alembic runs its own event loop).

    Refuses (MigrationRefused) a revision that is unknown, or that the database is already past: upgrading to
    an older revision would silently do nothing, and going back is a downgrade (`downgrade`, deliberately).
    """
    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    config = alembic_config(url)
    script = ScriptDirectory.from_config(config)
    try:
        wanted = script.get_revision(revision)
    except CommandError as error:
        raise MigrationRefused(f"unknown revision {revision!r} ({error})") from None
    current = current_revision(url)
    if current is not None and wanted is not None and wanted.revision != current:
        older = {step.revision for step in script.iterate_revisions(current, "base")}
        if wanted.revision in older:
            raise MigrationRefused(
                f"the database is at {current}, past {wanted.revision}: migrate only upgrades. To go back, run "
                f"`alembic downgrade {wanted.revision}` from this release's checkout, knowing that code older than "
                f"the schema's oldest served revision stops (deploy/README.md, Rolling upgrade)")
    if revision == "base" and current is not None:
        raise MigrationRefused(f"the database is at {current}: `base` would be a downgrade to nothing")
    command.upgrade(config, revision)


def downgrade(url: str, revision: str) -> None:
    """Revert migrations down to `revision`."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)
