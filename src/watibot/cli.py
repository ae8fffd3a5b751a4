"""The `watibot` command.

Exit codes: 0 success; 1 a runtime failure (database unreachable, migration failed); 2 bad usage or an invalid
setting (the message names the variable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from watibot import db
from watibot.logs import configure_logging, uvicorn_log_config
from watibot.settings import ConfigError, Settings, load_settings

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("watibot.cli")

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


def _metrics_directory() -> tuple[str, bool]:
    """Where the workers' prometheus-client files go: a fresh directory, or the configured one emptied.

    Set before any worker starts (prometheus_client reads it on import), so that /metrics in any worker sums
    all of them. Returns the path and whether serve created it (and so removes it on exit).
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # counters of a previous run would be added to this run's
            stale.unlink()
        for stale in path.glob("metrics-body.*"):  # the workers' shared /metrics body (watibot.metrics)
            stale.unlink(missing_ok=True)
        return configured, False
    created = tempfile.mkdtemp(prefix="watibot-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = created
    return created, True


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
        log.info("no WATIBOT_DATABASE_URL; starting embedded PostgreSQL in %s", cluster.data_dir)
        cluster.start()
        url = cluster.url()
    else:
        url = settings.database_url
    migration_url = settings.migration_database_url or url
    metrics_directory, created = _metrics_directory()
    try:
        asyncio.run(db.wait_for_database(url, settings.db_startup_timeout_seconds))
        if not args.no_migrate:
            if migration_url != url:
                asyncio.run(db.wait_for_database(migration_url, settings.db_startup_timeout_seconds))
            db.upgrade(migration_url)
        _check_connection_budget(settings, url, migration_url, args.workers)
        os.environ["WATIBOT_DATABASE_URL"] = url
        uvicorn.run(
            "watibot.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
            log_level=settings.log_level.lower(), timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
            access_log=False, log_config=uvicorn_log_config(settings.log_level, settings.log_format),
        )
    except _Terminated:
        log.info("stopped")
    finally:
        if created:
            shutil.rmtree(metrics_directory, ignore_errors=True)
        if cluster is not None:
            cluster.stop()
    return EXIT_OK


def _check_connection_budget(settings: Settings, url: str, migration_url: str, workers: int) -> None:
    """Warn when this serve's own connections (workers x pool size) cannot fit what PostgreSQL has free."""
    needed = workers * settings.db_pool_size
    if migration_url != url:
        log.info("connections go through a pooler (WATIBOT_MIGRATION_DATABASE_URL differs): this serve opens up "
                 "to %d (%d workers x WATIBOT_DB_POOL_SIZE %d) to it; PostgreSQL sees at most the pooler's pool",
                 needed, workers, settings.db_pool_size)
        return
    try:
        budget = asyncio.run(db.connection_budget(url, settings.db_timeout_seconds))
    except db.DatabaseError as error:
        log.warning("could not read the connection budget: %s", error)
        return
    if needed > budget.free:
        log.warning(
            "connection budget: this serve may open %d connections (%d workers x WATIBOT_DB_POOL_SIZE %d) but "
            "PostgreSQL has %d free (max_connections %d, %d reserved, %d in use by others): lower the pool or "
            "the workers, raise max_connections, or put PgBouncer in front (deploy/README.md, Connection budget)",
            needed, workers, settings.db_pool_size, budget.free, budget.max_connections, budget.reserved,
            budget.in_use)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    with _database(settings) as url:
        target = settings.migration_database_url or url
        asyncio.run(db.wait_for_database(target, settings.db_startup_timeout_seconds))
        try:
            db.upgrade(target, args.revision)
        except db.MigrationRefused as error:
            print(f"watibot: {error}", file=sys.stderr)
            return EXIT_USAGE
        revision = db.current_revision(target)
    print(f"watibot: database at {revision}", file=sys.stderr)
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


class _SchemaMismatch(Exception):
    """The database is not at the revision this code reads (operator commands use the 0002 views)."""


async def _with_stores(settings: Settings, action: Callable[[Any], Any]) -> Any:
    from watibot.store import Stores

    with _database(settings) as url:
        pool = await db.create_pool(settings, url)
        try:
            return await action(Stores.over(pool, settings))
        finally:
            await pool.close()


async def _with_current_schema(settings: Settings, action: Callable[[Any], Any]) -> Any:
    """As `_with_stores`, after checking the schema revision (a clear message instead of a missing view)."""

    async def checked(stores: Any) -> Any:
        if await stores.instance.migrated_revision() is None:
            raise _SchemaMismatch(f"the database schema is not migrated, this watibot expects "
                                  f"{db.SCHEMA_REVISION}: run `watibot migrate`")
        problem = await stores.instance.schema_problem()
        if problem is not None:
            raise _SchemaMismatch(problem)
        return await action(stores)

    return await _with_stores(settings, checked)


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from watibot import operators

    data = asyncio.run(_with_current_schema(settings, lambda stores: operators.status_data(stores.operators)))
    if args.json:
        import json

        print(json.dumps(data, default=str))
        return EXIT_OK
    operators.render_status(operators.console(), data)
    return EXIT_OK


def cmd_conversation(settings: Settings, args: argparse.Namespace) -> int:
    from watibot import operators

    stories = asyncio.run(_with_current_schema(
        settings, lambda stores: stores.operators.conversation_story(args.wa_id)))
    if not stories:
        print(f"watibot: no conversation with customer or waId {args.wa_id}", file=sys.stderr)
        return EXIT_FAILURE
    out = operators.console()
    for story in stories:
        operators.render_conversation(out, story)
    return EXIT_OK


def cmd_dead(settings: Settings, args: argparse.Namespace) -> int:
    from watibot import operators

    bursts = asyncio.run(_with_current_schema(settings, lambda stores: stores.operators.dead_bursts(args.limit)))
    if args.json:
        import json

        print(json.dumps(bursts, default=str))
    else:
        operators.render_dead(operators.console(), bursts)
    return EXIT_OK


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from watibot import operators
    from watibot.store.records import ReplayRefused

    try:
        result = asyncio.run(_with_current_schema(
            settings, lambda stores: stores.operators.replay(args.burst_id, force=args.force)))
    except ReplayRefused as error:
        print(f"watibot: {error}", file=sys.stderr)
        return EXIT_FAILURE
    print(operators.describe_replay(result))
    return EXIT_OK


def cmd_prune(settings: Settings, args: argparse.Namespace) -> int:
    from watibot.store.records import PROBLEM_STATUSES

    keep = () if args.include_dead else PROBLEM_STATUSES

    async def prune(stores: Any) -> tuple[int, int]:
        cutoff = await stores.instance.database_now() - args.older_than
        bursts = messages = 0
        while True:
            batch_bursts, batch_messages = await stores.operators.prune_batch(cutoff, keep, args.batch_size)
            bursts, messages = bursts + batch_bursts, messages + batch_messages
            if batch_bursts < args.batch_size:
                return bursts, messages

    bursts, messages = asyncio.run(_with_current_schema(settings, prune))
    print(f"pruned {bursts} bursts and {messages} messages finished more than {args.older_than} ago")
    return EXIT_OK


def cmd_webhook_url(settings: Settings, args: argparse.Namespace) -> int:
    from watibot.app import resolve_passkey

    passkey = asyncio.run(_with_stores(
        settings, lambda stores: resolve_passkey(settings, stores.instance, warn=False)))
    print(f"{args.base_url.rstrip('/')}/webhook?passkey={passkey.decode()}")
    return EXIT_OK


MAX_AGE_DAYS = 36_500  # a hundred years: any longer cutoff is before every row (and past datetime's range)
BIGINT_MAX = 2**63 - 1  # burst ids are PostgreSQL bigints


def _duration(text: str) -> Any:
    from datetime import timedelta

    from watibot.operators import parse_duration

    try:
        value = parse_duration(text)
    except (ValueError, OverflowError) as error:
        raise argparse.ArgumentTypeError(str(error) if isinstance(error, ValueError)
                                         else f"{text!r} is longer than {MAX_AGE_DAYS} days") from None
    if value > timedelta(days=MAX_AGE_DAYS):
        raise argparse.ArgumentTypeError(f"{text!r} is longer than {MAX_AGE_DAYS} days")
    return value


def _whole(maximum: int, minimum: int = 1) -> Callable[[str], int]:
    """An argparse type: a whole number from `minimum` to `maximum`, else a usage error (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{text!r} is not between {minimum} and {maximum}")
        return value

    return parse


_positive = _whole(1_000_000)


def _text_argument(text: str) -> str:
    """An argparse type: text that is valid UTF-8 (a shell can pass any bytes) and not absurdly long."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text") from None
    if len(text) > 512:
        raise argparse.ArgumentTypeError("is longer than 512 characters")
    return text


EXIT_CODES_HELP = "Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="watibot",
        description="Answer WhatsApp (WATI) customers with an AI agent, one reply per burst of messages. "
        "Configuration comes from WATIBOT_* environment variables and .env (see README).",
        epilog=EXIT_CODES_HELP,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the webhook server and a sweeper in every worker",
                                description="Apply pending migrations once (over WATIBOT_MIGRATION_DATABASE_URL "
                                "when set, e.g. past a transaction-pooling PgBouncer), warn when workers x "
                                "WATIBOT_DB_POOL_SIZE cannot fit PostgreSQL's free connections, then run uvicorn "
                                "with N workers, each with its own sweeper (SIGTTIN / SIGTTOU to this process add "
                                "or remove one). With no WATIBOT_DATABASE_URL an embedded PostgreSQL "
                                "is started under WATIBOT_DATA_DIR and stopped on exit. The workers share their "
                                "/metrics counters through PROMETHEUS_MULTIPROC_DIR (a fresh temporary directory "
                                "unless set; emptied at start). SIGTERM stops gracefully.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_whole(65535), default=8006, help="port to listen on (default 8006)")
    serve.add_argument("--workers", type=_whole(256), default=4, help="uvicorn worker processes (default 4)")
    serve.add_argument("--no-migrate", action="store_true", help="do not apply migrations before starting")
    serve.set_defaults(handler=cmd_serve)

    migrate = commands.add_parser("migrate", help="apply database migrations",
                                  description="Apply alembic migrations (same as `alembic upgrade head`), over "
                                  "WATIBOT_MIGRATION_DATABASE_URL when set. Safe to run from several hosts at once.")
    migrate.add_argument("revision", nargs="?", default="head", help="target revision (default head)")
    migrate.set_defaults(handler=cmd_migrate)

    status = commands.add_parser("status", help="counts of buffered, due, in-flight and dead work",
                                 description="Print what the buffer and the workers are doing right now: "
                                 "buffering, due and in-flight conversations, expired leases, buffered messages, "
                                 "dead and attention bursts, and the claims each worker holds. Exit 0 when the "
                                 "database answered, 1 when it did not.")
    status.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    status.set_defaults(handler=cmd_status)

    conversation = commands.add_parser(
        "conversation", help="one customer's messages, bursts and replies in order",
        description="Print a customer's conversation as a timeline: each message (and the burst that consumed "
        "it), each burst (status, attempts), each reply and error. Exit 1 when there is no such conversation.")
    conversation.add_argument("wa_id", metavar="WAID", type=_text_argument, help="the customer's waId (or bsuid)")
    conversation.set_defaults(handler=cmd_conversation)

    dead = commands.add_parser("dead", help="bursts that need a human, with reasons",
                               description="List dead bursts (gave up after retries or a permanent error) and "
                               "attention bursts (a send whose outcome is unknown, or a delivery WhatsApp "
                               "reported failed), oldest first.")
    dead.add_argument("--limit", type=_positive, default=100, help="at most this many (default 100)")
    dead.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    dead.set_defaults(handler=cmd_dead)

    replay = commands.add_parser(
        "replay", help="answer a dead or attention burst's messages again, in a new burst",
        description="Answer the messages of a dead or attention burst again: the burst becomes 'replayed' and a "
        "new burst over the same messages is due now (if a worker holds the conversation, it runs the new burst "
        "when it releases it). A burst whose reply WATI accepted, or whose send outcome is unknown, may already "
        "have reached the customer: it is refused without --force. Exit 1 (nothing changed) for a burst that does "
        "not exist, is not dead/attention, belongs to a conversation with a burst in progress, or needs --force.")
    replay.add_argument("burst_id", metavar="BURST_ID", type=_whole(BIGINT_MAX),
                        help="the burst id (watibot dead lists them)")
    replay.add_argument("--force", action="store_true",
                        help="replay even a burst whose reply WATI accepted or whose send outcome is unknown "
                        "(the customer may get a second answer)")
    replay.set_defaults(handler=cmd_replay)

    prune = commands.add_parser(
        "prune", help="delete old finished bursts and their messages",
        description="Delete bursts that finished before the cutoff (sent, no_reply, replayed, ...; dead and "
        "attention only with --include-dead) together with the messages they consumed, in small batches, each its own "
        "short transaction. Buffered messages and open bursts are never deleted. Pruned bursts stay counted in "
        "/metrics. Safe to run from cron while the service runs.")
    prune.add_argument("--older-than", required=True, type=_duration, metavar="AGE",
                       help="age of the bursts to delete, by finish time: 30d, 12h, 90m, 2w or 45s")
    prune.add_argument("--batch-size", type=_positive, default=500, help="bursts per transaction (default 500)")
    prune.add_argument("--include-dead", action="store_true",
                       help="also delete dead and attention bursts (after that they cannot be replayed)")
    prune.set_defaults(handler=cmd_prune)

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
    for command in commands.choices.values():
        command.epilog = EXIT_CODES_HELP
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"watibot: {error}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format)
    try:
        return int(args.handler(settings, args))
    except (db.DatabaseError, _SchemaMismatch) as error:
        print(f"watibot: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
