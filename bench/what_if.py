"""What-if: watibot's own app with one recommended change applied from outside, to measure it before anyone
changes `src/watibot`.

`uvicorn bench.what_if:create_app --factory` serves `watibot.app.create_app` with the asyncpg pool built with a
no-op `reset`. asyncpg otherwise sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;` on
every release — one extra round trip per pool use — although watibot keeps no session state (no LISTEN, no
advisory locks, no SET). asyncpg still rolls back a connection released inside a transaction.
"""

from __future__ import annotations

import asyncpg
from fastapi import FastAPI

from watibot import app as watibot_app
from watibot import db
from watibot.settings import Settings


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Nothing to reset: watibot sets no session state."""


async def create_pool_without_reset(settings: Settings, url: str, size: int | None = None) -> asyncpg.Pool:
    """`watibot.db.create_pool`, the same settings, plus `reset=` a no-op."""
    pool = asyncpg.create_pool(
        url, min_size=0, max_size=size or settings.db_pool_size, timeout=settings.db_timeout_seconds,
        command_timeout=settings.db_timeout_seconds, init=db._init_connection,
        server_settings={"application_name": "watibot"}, reset=_keep_session,
    )
    await pool
    return pool


def create_app() -> FastAPI:
    db.create_pool = create_pool_without_reset  # type: ignore[assignment]
    return watibot_app.create_app()
