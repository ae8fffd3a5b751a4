"""Rolling upgrade: code at revision N on a schema that moved on, by the rule of migration 0006 (expand/contract).

The running workers are this code (revision N = `db.SCHEMA_REVISION`). The test plays the next release's
migrations on the same database while they run: an *expand* step (a new column; its compatibility row says it
still serves N) and then a *contract* step (its row says it serves only itself). Code at N must keep working and
stay ready through the first, and turn not-ready with the reason, and stop claiming, at the second.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import ServeProcess, post, serve_environment, wait_until
from tests.fakes import FakeWati
from tests.invariants import check_invariant, message, wait_drained
from watibot import db

pytestmark = pytest.mark.processes
Sql = Callable[..., list[tuple[Any, ...]]]
EXPAND, CONTRACT = "0900_future_expand", "0901_future_contract"


def _migrate_to(database_url: str, revision: str, oldest_code: str, change: str) -> None:
    """What a later release's migration does: its schema change and its compatibility row, in one transaction."""
    with psycopg.connect(database_url) as conn, conn.transaction():
        conn.execute(change)  # type: ignore[arg-type]
        conn.execute("INSERT INTO watibot.schema_compatibility (revision, position, oldest_code_revision) "
                     "SELECT %s, max(position) + 1, %s FROM watibot.schema_compatibility", (revision, oldest_code))
        conn.execute("UPDATE watibot.alembic_version SET version_num = %s", (revision,))


def _roll_back_to(database_url: str, revision: str, dropped: str) -> None:
    """Undo a migration that never shipped: its row goes, the version goes back."""
    with psycopg.connect(database_url) as conn, conn.transaction():
        conn.execute("DELETE FROM watibot.schema_compatibility WHERE revision = %s", (dropped,))
        conn.execute("UPDATE watibot.alembic_version SET version_num = %s", (revision,))


def _readiness(serve: ServeProcess) -> httpx.Response:
    return httpx.get(f"{serve.url}/readyz", timeout=10)


def _status(database_url: str) -> subprocess.CompletedProcess[str]:
    env = {"WATIBOT_DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "watibot", "status"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_old_code_stays_ready_on_an_expanded_schema_and_stops_on_a_contracted_one(
    fault_db: str, fault_sql: Sql, processes: Callable[..., ServeProcess], fake_wati: FakeWati,
) -> None:
    """Workers at N answer customers and stay ready after an expand migration that declares it serves N; after a
    contract migration they answer /readyz 503 with the reason, claim nothing, and the operator commands refuse."""
    serve = processes(serve_environment(fault_db, fake_wati, WATIBOT_BUFFER_SECONDS="0.3"), workers=2)
    serve.wait_ready()
    assert post(serve, message("50377000001", "before-upgrade")) == 200
    fake_wati.wait_for_sent(1)

    _migrate_to(fault_db, EXPAND, db.SCHEMA_REVISION,
                "ALTER TABLE watibot.burst ADD COLUMN future_note text; "
                "CREATE FUNCTION watibot.future_function() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    for _ in range(5):  # every worker answers readiness; each must say ready
        assert _readiness(serve).json() == {"status": "ready"}
    assert post(serve, message("50377000002", "on-expanded")) == 200
    fake_wati.wait_for_sent(2)
    status = _status(fault_db)
    assert status.returncode == 0, status.stderr

    _migrate_to(fault_db, CONTRACT, CONTRACT, "ALTER TABLE watibot.burst DROP COLUMN future_note")
    refusal = f"schema at {CONTRACT} serves code from {CONTRACT} on; this code is at {db.SCHEMA_REVISION}"
    response = wait_until(lambda: (r := _readiness(serve)).status_code == 503 and r, timeout=30,
                          what="old workers to turn not-ready")
    assert any(problem.startswith(refusal) for problem in response.json()["problems"]), response.json()
    wait_until(lambda: serve.log_path.read_text().count("not claiming: " + refusal) >= 2, timeout=30,
               what="both workers to stop claiming")
    assert post(serve, message("50377000003", "on-contracted")) == 200  # stored: the new release will answer it
    wait_until(lambda: fault_sql("SELECT count(*) FROM watibot.conversation WHERE customer = '50377000003' "
                                 "AND claimed_by IS NULL AND due_at < now() - interval '3 seconds'") == [(1,)],
               timeout=30, what="the message to stay unclaimed well past its due time")
    assert len(fake_wati.sent) == 2
    status = _status(fault_db)
    assert (status.returncode, refusal in status.stderr) == (1, True), status.stderr

    # The contract step is rolled back (as a release that never shipped would be): the same workers resume.
    _roll_back_to(fault_db, EXPAND, CONTRACT)
    wait_until(lambda: _readiness(serve).status_code == 200, timeout=30, what="readiness again")
    fake_wati.wait_for_sent(3, timeout=60)
    wait_drained(fault_sql)
    check_invariant(fault_sql, fake_wati, {"before-upgrade", "on-expanded", "on-contracted"})
