"""The `watibot` command.

Exit codes: 0 success; 1 a runtime failure (database unreachable, migration failed); 2 bad usage or an invalid
setting (the message names the variable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from watibot import db
from watibot.logs import configure_logging
from watibot.settings import ConfigError, Settings, load_settings

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

@contextlib.contextmanager
def _database(settings: Settings) -> Iterator[str]:
    """The database URL for a one-off command; an embedded server started for it is stopped after."""
    if settings.database_url:
        yield settings.database_url
        return
    cluster = db.embedded_cluster(settings)
    was_running = cluster.running()
    cluster.start()
    try:
        yield cluster.url()
    finally:
        if not was_running:
            cluster.stop()


class _Terminated(Exception):
    """SIGTERM or SIGINT reached the serve parent."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    # uvicorn handles the signal for a graceful shutdown, then re-raises it; ours turns it into an exception
    # so the embedded server below is stopped cleanly (and so is a SIGTERM during startup).
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGINT, _raise_terminated)
    cluster = None
    if not settings.database_url:
        cluster = db.embedded_cluster(settings)
        print(f"watibot: no WATIBOT_DATABASE_URL; starting embedded PostgreSQL in {cluster.data_dir}",
              file=sys.stderr)
        cluster.start()
        url = cluster.url()
    else:
        url = settings.database_url
    try:
        asyncio.run(db.wait_for_database(url, settings.db_startup_timeout_seconds))
        if not args.no_migrate:
            db.upgrade(url)
        os.environ["WATIBOT_DATABASE_URL"] = url
        uvicorn.run(
            "watibot.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
            log_level=settings.log_level.lower(), timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
            access_log=False,
        )
    except _Terminated:
        print("watibot: stopped", file=sys.stderr)
    finally:
        if cluster is not None:
            cluster.stop()
    return EXIT_OK


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    with _database(settings) as url:
        asyncio.run(db.wait_for_database(url, settings.db_startup_timeout_seconds))
        db.upgrade(url, args.revision)
    print(f"watibot: database at {args.revision}", file=sys.stderr)
    return EXIT_OK


def cmd_db_url(settings: Settings, args: argparse.Namespace) -> int:
    if settings.database_url:
        print(settings.database_url)
        return EXIT_OK
    cluster = db.embedded_cluster(settings)
    if not cluster.initialised:
        print(f"watibot: no embedded database in {cluster.data_dir} yet; run `watibot serve` first",
              file=sys.stderr)
        return EXIT_FAILURE
    if not cluster.running():
        print("watibot: the embedded database is not running (it runs while `watibot serve` does)",
              file=sys.stderr)
    print(cluster.url())
    return EXIT_OK


async def _with_repository(settings: Settings, action: Callable[[Any], Any]) -> Any:
    from watibot.repository import Repository

    with _database(settings) as url:
        pool = await db.create_pool(settings, url)
        try:
            return await action(Repository(pool, settings))
        finally:
            await pool.close()


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    counts = asyncio.run(_with_repository(settings, lambda repository: repository.status()))
    if args.json:
        import json

        print(json.dumps(counts))
        return EXIT_OK
    oldest = counts["oldest_due_seconds"]
    rows = [
        ("buffering", counts["buffering"], "conversations waiting for their window to end"),
        ("due", counts["due"], "due and not yet claimed"),
        ("in flight", counts["in_flight"], "claimed, lease valid"),
        ("lease expired", counts["lease_expired"], "claimed, lease expired: will be taken over"),
        ("buffered messages", counts["buffered_messages"], "messages not yet answered"),
        ("dead / attention", counts["dead"], "bursts that need a human (watibot dead)"),
        ("oldest due", f"{oldest:.1f} s" if oldest is not None else "-", "how late the most overdue one is"),
    ]
    for name, value, meaning in rows:
        print(f"{name:<18} {value!s:>8}   {meaning}")
    return EXIT_OK


def cmd_webhook_url(settings: Settings, args: argparse.Namespace) -> int:
    from watibot.app import resolve_passkey

    passkey = asyncio.run(_with_repository(settings, lambda repository: resolve_passkey(settings, repository)))
    print(f"{args.base_url.rstrip('/')}/webhook?passkey={passkey.decode()}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="watibot",
        description="Answer WhatsApp (WATI) customers with an AI agent, one reply per burst of messages. "
        "Configuration comes from WATIBOT_* environment variables and .env (see README).",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the webhook server and a sweeper in every worker",
                                description="Apply pending migrations once, then run uvicorn with N workers, "
                                "each with its own sweeper. With no WATIBOT_DATABASE_URL an embedded PostgreSQL "
                                "is started under WATIBOT_DATA_DIR and stopped on exit.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8006, help="port to listen on (default 8006)")
    serve.add_argument("--workers", type=int, default=4, help="uvicorn worker processes (default 4)")
    serve.add_argument("--no-migrate", action="store_true", help="do not apply migrations before starting")
    serve.set_defaults(handler=cmd_serve)

    migrate = commands.add_parser("migrate", help="apply database migrations",
                                  description="Apply alembic migrations (same as `alembic upgrade head`).")
    migrate.add_argument("revision", nargs="?", default="head", help="target revision (default head)")
    migrate.set_defaults(handler=cmd_migrate)

    status = commands.add_parser("status", help="counts of buffered, due, in-flight and dead work",
                                 description="Print what the buffer and the workers are doing right now.")
    status.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    status.set_defaults(handler=cmd_status)

    db_url = commands.add_parser("db-url", help="print the effective database URL",
                                 description='Print the DSN in use, so that `psql "$(watibot db-url)"` works '
                                 "(the embedded server included, while it runs).")
    db_url.set_defaults(handler=cmd_db_url)

    webhook_url = commands.add_parser("webhook-url", help="print the webhook URL to configure in WATI",
                                      description="Print the webhook URL with its passkey (a secret: "
                                      "give it to WATI only).")
    webhook_url.add_argument("--base-url", default="http://127.0.0.1:8006",
                             help="public base URL of this service (default http://127.0.0.1:8006)")
    webhook_url.set_defaults(handler=cmd_webhook_url)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"watibot: {error}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level)
    try:
        return int(args.handler(settings, args))
    except db.DatabaseUnavailable as error:
        print(f"watibot: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
