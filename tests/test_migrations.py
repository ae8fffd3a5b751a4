"""Migrations: both directions, the alembic CLI at the repo root, and the schema the code expects."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watibot import db

ROOT = Path(__file__).resolve().parents[1]
Sql = Callable[..., list[tuple[Any, ...]]]


def tables(sql: Sql) -> list[str]:
    return [row[0] for row in sql("SELECT tablename FROM pg_tables WHERE schemaname = 'watibot' ORDER BY 1")]


def test_upgrade_downgrade_upgrade(database_url: str, sql: Sql) -> None:
    """The schema goes down to nothing and back up to the revision the code expects."""
    assert sql("SELECT version_num FROM watibot.alembic_version") == [(db.SCHEMA_REVISION,)]
    db.downgrade(database_url, "base")
    assert tables(sql) == ["alembic_version"]
    db.upgrade(database_url)
    assert tables(sql) == ["alembic_version", "burst", "burst_totals_mark", "burst_totals_rollup", "conversation",
                           "instance_secret", "message", "pruned_burst_totals", "schema_compatibility",
                           "wati_message"]
    assert sql("SELECT version_num FROM watibot.alembic_version") == [(db.SCHEMA_REVISION,)]


def test_alembic_upgrade_head_works_at_the_repo_root(database_url: str, sql: Sql) -> None:
    """`alembic upgrade head` from the repository root uses WATIBOT_DATABASE_URL, like the service."""
    db.downgrade(database_url, "base")
    env = {**os.environ, "WATIBOT_DATABASE_URL": database_url}
    result = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert sql("SELECT version_num FROM watibot.alembic_version") == [(db.SCHEMA_REVISION,)]


def test_burst_functions_exist_and_downgrade_cleanly(database_url: str, sql: Sql) -> None:
    """The burst-step functions are created with comments and dropped again by their revision's downgrade."""
    functions = "SELECT proname FROM pg_proc WHERE pronamespace = 'watibot'::regnamespace AND proname = ANY(%s) ORDER BY 1"
    names = ["begin_burst", "burst_messages", "claim_due", "finish_bursts", "release_claim", "release_claims"]
    assert [row[0] for row in sql(functions, names)] == names
    assert sql("SELECT count(*) FROM pg_proc WHERE pronamespace = 'watibot'::regnamespace AND proname = ANY(%s) "
               "AND obj_description(oid, 'pg_proc') IS NULL", names) == [(0,)]
    db.downgrade(database_url, "0003_operability")
    assert sql(functions, names) == []
    db.upgrade(database_url)


def test_every_table_and_column_that_needs_it_is_commented(sql: Sql) -> None:
    """`\\d+` explains the schema: every watibot table has a comment, and so do the claim columns."""
    uncommented = sql(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'watibot' AND c.relkind = 'r' AND c.relname <> 'alembic_version' "
        "AND obj_description(c.oid, 'pg_class') IS NULL")
    assert uncommented == []
    for column in ("due_at", "claimed_by", "lease_expires_at", "fence"):
        (comment,) = sql("SELECT col_description('watibot.conversation'::regclass, attnum) FROM pg_attribute "
                         "WHERE attrelid = 'watibot.conversation'::regclass AND attname = %s", column)[0]
        assert comment, column


def test_hot_conversation_table_is_tuned_against_bloat(sql: Sql) -> None:
    """The conversation table leaves room for HOT updates and is vacuumed early."""
    (options,) = sql("SELECT reloptions FROM pg_class WHERE oid = 'watibot.conversation'::regclass")[0]
    assert "fillfactor=70" in options
    assert any(option.startswith("autovacuum_vacuum_scale_factor") for option in options)


def test_burst_table_is_tuned_and_the_operability_revision_downgrades_cleanly(database_url: str, sql: Sql) -> None:
    """The operability revision sets fillfactor on burst and drops its views and settings again on downgrade."""
    (options,) = sql("SELECT reloptions FROM pg_class WHERE oid = 'watibot.burst'::regclass")[0]
    assert "fillfactor=80" in options
    db.downgrade(database_url, "0002_conversations")
    assert sql("SELECT count(*) FROM pg_views WHERE schemaname = 'watibot'") == [(0,)]
    assert sql("SELECT reloptions FROM pg_class WHERE oid = 'watibot.burst'::regclass") == [(None,)]
    db.upgrade(database_url)
    assert sql("SELECT version_num FROM watibot.alembic_version") == [(db.SCHEMA_REVISION,)]


def test_concurrent_migrate_commands_on_an_empty_database_both_succeed(postgres_admin_url: str) -> None:
    """Two hosts running `watibot migrate` at once (ExecStartPre) serialise on an advisory lock; both exit 0."""
    import uuid

    from tests.conftest import admin_execute, with_database

    name = f"race_{uuid.uuid4().hex[:8]}"
    admin_execute(postgres_admin_url, f"CREATE DATABASE {name}")
    try:
        base = {key: value for key, value in os.environ.items() if not key.startswith("WATIBOT_")}
        env = base | {"WATIBOT_DATABASE_URL": with_database(postgres_admin_url, name)}
        processes = [subprocess.Popen([sys.executable, "-m", "watibot", "migrate"], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(6)]
        results = [(process.wait(timeout=120), process.stderr.read() if process.stderr else "")
                   for process in processes]
        for process in processes:
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        assert [code for code, _ in results] == [0] * 6, results
    finally:
        admin_execute(postgres_admin_url, f"DROP DATABASE {name} WITH (FORCE)")


def test_readyz_reports_a_schema_at_another_revision(
    run_app: Callable[..., Any], database_url: str
) -> None:
    """/readyz answers 503 naming both revisions when the database is not at the one this code expects."""
    import httpx

    from tests.conftest import app_settings, previous_revision

    app = run_app(app_settings(database_url))
    assert httpx.get(f"{app.url}/readyz").json() == {"status": "ready"}
    db.downgrade(database_url, previous_revision())
    response = httpx.get(f"{app.url}/readyz")
    assert response.status_code == 503
    assert response.json()["problems"] == [
        f"schema at {previous_revision()}, expected {db.SCHEMA_REVISION}: run `watibot migrate`"]
    assert httpx.get(f"{app.url}/healthz").status_code == 200, "liveness does not depend on the schema"


def test_every_revision_declares_the_oldest_code_it_serves_in_history_order(sql: Sql) -> None:
    """Each migration leaves a schema_compatibility row; positions follow the history and point backwards."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(db.alembic_config("postgresql://unused"))
    history = [revision.revision for revision in reversed(list(script.walk_revisions()))]
    rows = sql("SELECT revision, position, oldest_code_revision FROM watibot.schema_compatibility ORDER BY position")
    assert [revision for revision, _, _ in rows] == history
    assert [position for _, position, _ in rows] == list(range(1, len(history) + 1))
    position = {revision: number for revision, number, _ in rows}
    assert all(position[oldest] <= position[revision] for revision, _, oldest in rows)


def test_compatibility_rule_serves_code_between_the_oldest_declared_and_the_schema() -> None:
    """Code runs on its own revision or a later one that still serves it; never on an older or contracted one."""
    rows = {"a": (1, "a"), "b": (2, "a"), "c": (3, "b"), "d": (4, "d")}
    assert db.compatibility_problem("b", "b", rows) is None
    assert db.compatibility_problem("b", "c", rows) is None  # expand: c serves b
    assert db.compatibility_problem("a", "b", rows) is None
    assert "serves code from b on" in (db.compatibility_problem("a", "c", rows) or "")  # contracted past a
    assert "serves code from d on" in (db.compatibility_problem("c", "d", rows) or "")
    assert "run `watibot migrate`" in (db.compatibility_problem("c", "b", rows) or "")  # schema older than code
    assert "run `watibot migrate`" in (db.compatibility_problem("b", "a", {}) or "")  # before the table existed
    assert "run `watibot migrate`" in (db.compatibility_problem("e", "d", rows) or "")  # code unknown to schema


def _old_shape_data(sql: Sql) -> None:
    """At 0006: customer a has a sent burst (2 messages), an open burst (2) and one more buffered message;
    customer b has an operator's message after its first message and a second one buffered."""
    sql("INSERT INTO watibot.conversation (channel, customer, wa_id, due_at, buffer_started_at, claimed_by, "
        "claimed_at, lease_expires_at, fence, human_message_at) VALUES "
        "('c', 'a', 'a', now() + interval '30 s', now(), 'w', now(), now() + interval '30 s', 3, NULL), "
        "('c', 'b', 'b', now() + interval '1 min', now(), NULL, NULL, NULL, 0, now() - interval '1 s')")

    def message(customer: str, text: str, burst_id: int | None, received: str) -> int:
        return int(sql("INSERT INTO watibot.message (channel, customer, provider_message_id, type, text, payload, "
                       "burst_id, received_at) VALUES ('c', %s, %s, 'text', %s, '{}', %s, now() - %s::interval) "
                       "RETURNING id", customer, f"wamid.{text}", text, burst_id, received)[0][0])

    sent = int(sql("INSERT INTO watibot.burst (channel, customer, status, message_ids, fence, claimed_by, "
                   "finished_at, reply) VALUES ('c', 'a', 'sent', '{}', 1, 'w', now(), 'hi') RETURNING id")[0][0])
    ids = [message("a", "a1", sent, "9 s"), message("a", "a2", sent, "8 s")]
    sql("UPDATE watibot.burst SET message_ids = %s WHERE id = %s", ids, sent)
    opened = [message("a", "a3", None, "5 s"), message("a", "a4", None, "4 s")]
    sql("INSERT INTO watibot.burst (channel, customer, status, message_ids, fence, claimed_by) "
        "VALUES ('c', 'a', 'processing', %s, 3, 'w')", opened)
    message("a", "a5", None, "1 s")
    message("b", "b1", None, "3 s")
    message("b", "b2", None, "0 s")


def test_an_existing_database_upgrades_with_its_buffer_open_bursts_and_history_and_downgrades_back(
    database_url: str, sql: Sql
) -> None:
    """0006 → 0007 turns burst_id and message_ids into positions, ranges and high-water marks without losing or
    moving a message; 0007 → 0006 gives the same burst_id and message_ids back."""
    db.downgrade(database_url, "0006_schema_compatibility")
    _old_shape_data(sql)
    before = sql("SELECT m.text, m.burst_id FROM watibot.message m ORDER BY m.id")
    ids_before = sql("SELECT id, status, message_ids FROM watibot.burst ORDER BY id")
    db.upgrade(database_url)
    assert sql("SELECT customer, last_position, answered_position, human_position, open_burst_id IS NOT NULL "
               "FROM watibot.conversation ORDER BY customer") == [("a", 5, 2, None, True), ("b", 2, 0, 1, False)]
    assert sql("SELECT status, after_position, through_position, messages FROM watibot.burst ORDER BY id") == [
        ("sent", 0, 2, 2), ("processing", 2, 4, 2)]
    assert sql("SELECT text, position, status FROM watibot.message_outcome ORDER BY customer, position") == [
        ("a1", 1, "sent"), ("a2", 2, "sent"), ("a3", 3, None), ("a4", 4, None), ("a5", 5, None),
        ("b1", 1, None), ("b2", 2, None)]
    db.downgrade(database_url, "0006_schema_compatibility")
    assert sql("SELECT m.text, m.burst_id FROM watibot.message m ORDER BY m.id") == before
    assert sql("SELECT id, status, message_ids FROM watibot.burst ORDER BY id") == ids_before
    db.upgrade(database_url)
    assert sql("SELECT version_num FROM watibot.alembic_version") == [(db.SCHEMA_REVISION,)]
