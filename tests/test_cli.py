"""The watibot command: configuration errors, exit codes and the operator commands."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import PASSKEY, add_message
from watibot.settings import load_settings

Sql = Callable[..., list[tuple[Any, ...]]]


def watibot(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("WATIBOT_")}
    return subprocess.run([sys.executable, "-m", "watibot", *args], env=base | (env or {}), capture_output=True,
                          text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("WATIBOT_BUFFER_SECONDS", "soon", "WATIBOT_BUFFER_SECONDS"),
        ("WATIBOT_BUFFER_MODE", "random", "WATIBOT_BUFFER_MODE"),
        ("WATIBOT_CONCURRENCY", "0", "WATIBOT_CONCURRENCY"),
        ("WATIBOT_WEBHOOK_PASSKEY", "short", "at least 16 characters"),
        ("WATIBOT_AGENT", "gpt", "WATIBOT_AGENT"),
        ("WATIBOT_AGENT", "http", "WATIBOT_AGENT_URL is required"),
        ("WATIBOT_DATABASE_URL", "mysql://x", "WATIBOT_DATABASE_URL"),
        ("WATIBOT_LEASE_SECONDS", "0", "WATIBOT_LEASE_SECONDS"),
        ("WATIBOT_METRICS_TOKEN", "short", "WATIBOT_METRICS_TOKEN: must be at least 16 characters"),
        ("WATIBOT_METRICS_TOKEN", "token with spaces in it", "WATIBOT_METRICS_TOKEN: must be printable ASCII"),
        ("WATIBOT_METRICS_TOKEN", "jeton-métriques-secret", "WATIBOT_METRICS_TOKEN: must be printable ASCII"),
        ("WATIBOT_METRICS_CACHE_SECONDS", "3600", "WATIBOT_METRICS_CACHE_SECONDS"),
        ("WATIBOT_WEBHOOK_BODY_TIMEOUT_SECONDS", "0", "WATIBOT_WEBHOOK_BODY_TIMEOUT_SECONDS"),
        ("WATIBOT_BURST_MAX_MESSAGES", "0", "WATIBOT_BURST_MAX_MESSAGES"),
        ("WATIBOT_BURST_MAX_CHARS", "10", "WATIBOT_BURST_MAX_CHARS"),
        ("WATIBOT_REPLY_MAX_PARTS", "0", "WATIBOT_REPLY_MAX_PARTS"),
    ],
)
def test_invalid_setting_stops_startup_naming_the_variable(variable: str, value: str, message: str) -> None:
    """An invalid value exits with code 2 and a message that names the variable."""
    result = watibot("serve", env={variable: value})
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_wati_timeout_follows_the_lease_unless_set() -> None:
    """Unset, the WATI timeout is the smaller of 15 s and half the lease; set, it must stay below the lease."""
    assert load_settings(_env_file=None, lease_seconds=10).wati_timeout_seconds == 5
    assert load_settings(_env_file=None, lease_seconds=60).wati_timeout_seconds == 15
    assert load_settings(_env_file=None, lease_seconds=10, wati_timeout_seconds=8).wati_timeout_seconds == 8
    result = watibot("serve", env={"WATIBOT_LEASE_SECONDS": "10", "WATIBOT_WATI_TIMEOUT_SECONDS": "15"})
    assert result.returncode == 2
    assert "WATIBOT_LEASE_SECONDS (10) must exceed WATIBOT_WATI_TIMEOUT_SECONDS (15)" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_database_exits_1_with_a_clear_message() -> None:
    """serve against a database that never answers gives up after the startup timeout with exit code 1."""
    result = watibot("serve", env={"WATIBOT_DATABASE_URL": "postgresql://postgres@127.0.0.1:9/none",
                                   "WATIBOT_DB_STARTUP_TIMEOUT_SECONDS": "1"})
    assert result.returncode == 1
    assert "database not reachable after 1 s" in result.stderr


def test_help_lists_the_commands() -> None:
    """--help documents every command and the exit codes."""
    result = watibot("--help")
    assert result.returncode == 0
    for command in ("serve", "migrate", "status", "db-url", "webhook-url", "Exit codes"):
        assert command in result.stdout


def test_db_url_prints_the_configured_url(database_url: str) -> None:
    """db-url prints the DSN so that psql "$(watibot db-url)" works."""
    result = watibot("db-url", env={"WATIBOT_DATABASE_URL": database_url})
    assert (result.returncode, result.stdout.strip()) == (0, database_url)


def test_status_counts_what_the_buffer_holds(database_url: str, sql: Sql) -> None:
    """status reports buffered conversations and messages from the database."""
    sql("INSERT INTO watibot.conversation (channel, customer, due_at) VALUES ('c', '1', now() + interval '1 hour')")
    add_message(sql, "1", provider_message_id="w1")
    result = watibot("status", "--json", env={"WATIBOT_DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    import json

    counts = json.loads(result.stdout)
    assert (counts["buffering"], counts["buffered_messages"], counts["due"], counts["dead"]) == (1, 1, 0, 0)
    table = watibot("status", env={"WATIBOT_DATABASE_URL": database_url})
    assert "buffering" in table.stdout


def test_webhook_url_uses_the_generated_passkey_when_none_is_set(database_url: str, sql: Sql) -> None:
    """With no passkey configured one is generated once, kept in the database, and printed in the URL."""
    first = watibot("webhook-url", "--base-url", "https://bot.example", env={"WATIBOT_DATABASE_URL": database_url})
    second = watibot("webhook-url", "--base-url", "https://bot.example", env={"WATIBOT_DATABASE_URL": database_url})
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    (stored,) = sql("SELECT value FROM watibot.instance_secret WHERE name = 'webhook_passkey'")[0]
    assert first.stdout.strip() == f"https://bot.example/webhook?passkey={stored}"
    assert len(stored) >= 32
    configured = watibot("webhook-url", env={"WATIBOT_DATABASE_URL": database_url,
                                             "WATIBOT_WEBHOOK_PASSKEY": PASSKEY})
    assert configured.stdout.strip().endswith(f"passkey={PASSKEY}")


def test_operator_commands_print_no_worker_warnings(database_url: str) -> None:
    """status and webhook-url with no passkey configured print their output and nothing on stderr."""
    for args in (["webhook-url"], ["status"], ["status", "--json"], ["dead"]):
        result = watibot(*args, env={"WATIBOT_DATABASE_URL": database_url})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip()
        assert result.stderr == "", f"{args}: {result.stderr}"


@pytest.mark.parametrize(
    "args",
    [
        ["replay", "999999999999999999999"], ["replay", "0"], ["replay", "-3"], ["replay", "1e3"],
        ["dead", "--limit", "99999999999999999999"], ["dead", "--limit", "0"], ["dead", "--limit", "ten"],
        ["prune", "--older-than", "30d", "--batch-size", "99999999999999999999"],
        ["prune", "--older-than", "30d", "--batch-size", "-1"],
        ["prune", "--older-than", "99999999999d"], ["prune", "--older-than", "36501d"],
        ["prune", "--older-than", "999999999999999999999w"],
        ["conversation", "\udcff\udcfe"], ["conversation", "5" * 513],
        ["serve", "--workers", "0"], ["serve", "--port", "70000"], ["serve", "--workers", "many"],
    ],
)
def test_bad_command_arguments_are_usage_errors_without_a_traceback(database_url: str, args: list[str]) -> None:
    """Out-of-range numbers, absurd ages and identifiers that are not UTF-8 exit 2 with a message, touching nothing."""
    result = watibot(*args, env={"WATIBOT_DATABASE_URL": database_url})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: argument" in result.stderr


@pytest.mark.parametrize("revision", ["0001_core", "base", "0005_batched_steps", "no_such_revision"])
def test_migrate_refuses_to_go_back_or_to_an_unknown_revision_and_changes_nothing(
    database_url: str, sql: Sql, revision: str
) -> None:
    """`watibot migrate OLDER` on a database at head exits 2 saying it only upgrades; the schema stays at head."""
    from watibot import db

    result = watibot("migrate", revision, env={"WATIBOT_DATABASE_URL": database_url})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert ("migrate only upgrades" in result.stderr or "downgrade to nothing" in result.stderr
            or "unknown revision" in result.stderr)
    assert sql("SELECT version_num FROM watibot.alembic_version") == [(db.SCHEMA_REVISION,)]
    again = watibot("migrate", env={"WATIBOT_DATABASE_URL": database_url})
    assert (again.returncode, f"database at {db.SCHEMA_REVISION}" in again.stderr) == (0, True)
