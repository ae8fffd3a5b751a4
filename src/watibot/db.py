"""Connection pool, database URL resolution and the translation of driver errors.

The rest of the code never names `asyncpg` exceptions: everything that means "the database is not there right
now" becomes `DatabaseUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg

from watibot.embedded import EmbeddedCluster
from watibot.settings import Settings, load_settings

log = logging.getLogger("watibot.db")

SCHEMA_REVISION = "0005_batched_steps"


class DatabaseUnavailable(Exception):
    """The database could not be reached or did not answer in time."""


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


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn connection-level driver errors into `DatabaseUnavailable`."""
    try:
        yield
    except _UNAVAILABLE as error:
        raise DatabaseUnavailable(f"{type(error).__name__}: {error}") from error


async def _init_connection(connection: asyncpg.Connection) -> None:
    await connection.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Pool reset on release: nothing to undo.

    asyncpg rolls back an open transaction before calling this; watibot sets no session state, holds no
    advisory locks, cursors or LISTENs, so the default reset (4 statements and a round trip per release) is
    pure cost: it was a sixth of a worker's time in the drain benchmark.
    """


async def create_pool(settings: Settings, url: str) -> asyncpg.Pool:
    """Open the pool. Connections are made lazily, so this succeeds while the database is down."""
    pool = asyncpg.create_pool(
        url,
        min_size=0,
        max_size=settings.db_pool_size,
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


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision` (synchronously; alembic runs its own event loop)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Revert migrations down to `revision`."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)
