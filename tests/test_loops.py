"""Background loops cannot die: any error is logged once, backed off and survived; a wedged loop fails /healthz.

The database faults are real: a read-only server (what a service meets on a standby during a failover), and
errors PostgreSQL itself raises from a trigger with the SQLSTATE of a deadlock or one watibot has never heard of.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import (
    RunningApp,
    ServeProcess,
    app_settings,
    children,
    post,
    serve_environment,
    wait_until,
)
from tests.fakes import Answer, FakeAgent, FakeWati, echo_reply
from tests.invariants import check_invariant, message, wait_drained
from watibot.db import StatementFailed
from watibot.loops import LoopMonitor

Sql = Callable[..., list[tuple[Any, ...]]]


def test_monitor_logs_a_repeated_error_once_backs_off_boundedly_and_reports_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same error five times is one log line with its SQLSTATE; delays grow, jittered, up to the cap."""
    monitor = LoopMonitor("claim", backoff_base=1.0, backoff_max=8.0)
    with caplog.at_level(logging.WARNING, logger="watibot.loops"):
        delays = [monitor.failed(StatementFailed("deadlock detected", "40P01")) for _ in range(5)]
        monitor.failed(RuntimeError("something else"))
        monitor.succeeded()
    lines = [record.getMessage() for record in caplog.records]
    assert sum("deadlock detected (SQLSTATE 40P01)" in line for line in lines) == 1
    assert sum("failed: RuntimeError: something else" in line for line in lines) == 1
    assert any("claim loop recovered after 6 failed iterations" in line for line in lines)
    bounds = [(0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, 8.0), (4.0, 8.0)]
    assert all(low <= delay <= high for delay, (low, high) in zip(delays, bounds, strict=True)), delays
    assert monitor.failures == 0 and monitor.iterations == 7


def test_a_wedged_claim_loop_fails_healthz_then_the_worker_restarts_itself(database_url: str) -> None:
    """A claim loop stuck inside an iteration (a hang no timeout catches) turns /healthz 503 past the bound, and
    past twice the bound the watchdog ends the worker (observed here instead of exiting the test process)."""
    settings = app_settings(database_url, poll_seconds=0.2, lease_seconds=3.0, db_timeout_seconds=0.5,
                            wati_timeout_seconds=1.0, loop_stall_seconds=3.5)
    running = RunningApp(settings)
    exits: list[str] = []
    running.server.config.app.state.on_wedged = exits.append  # type: ignore[union-attr]
    hang = threading.Event()
    with running as app:
        assert app.client.get("/healthz").status_code == 200

        async def wedged() -> float | None:  # a bug that awaits forever, as a deadlocked library call would
            await asyncio.get_running_loop().run_in_executor(None, hang.wait, 60)
            return None

        app.sweeper._sweep_once = wedged
        try:
            response = wait_until(lambda: (r := app.client.get("/healthz")).status_code == 503 and r, timeout=30,
                                  what="/healthz to fail")
            (problem,) = response.json()["problems"]
            assert problem.startswith("claim loop has not completed an iteration for ")
            assert "(bound 3.5 s)" in problem
            wait_until(lambda: exits, timeout=30, what="the watchdog to end the worker")
            assert exits[0].startswith("claim loop has not completed an iteration for ")
            assert "(bound 7 s)" in exits[0]
        finally:
            hang.set()


def test_healthz_fails_when_a_loop_task_has_ended(run_app: Callable[..., RunningApp], database_url: str) -> None:
    """A loop whose task ended (whatever ended it) makes the process unhealthy at once."""
    app = run_app(app_settings(database_url))
    task = app.sweeper.heartbeat_monitor.task
    task.get_loop().call_soon_threadsafe(task.cancel)
    response = wait_until(lambda: (r := app.client.get("/healthz")).status_code == 503 and r, timeout=30,
                          what="/healthz to fail")
    assert response.json()["problems"] == ["heartbeat loop has ended"]


# -- real database faults against `watibot serve` --------------------------------------------------------------

def _read_only(fault_db: str, on: bool) -> None:
    """Make the database read-only for every session (or writable again), as a standby is: the setting applies
    to new sessions, so watibot's are ended and its pools reconnect (a failover drops them too)."""
    name = fault_db.rsplit("/", 1)[1]
    with psycopg.connect(fault_db.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        if on:
            conn.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")  # type: ignore[arg-type]
        else:
            conn.execute(f"ALTER DATABASE {name} RESET default_transaction_read_only")  # type: ignore[arg-type]
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name = 'watibot' AND datname = %s", (name,))


def _make_due(fault_db: str) -> None:
    """Make the buffered conversations due now, bypassing test triggers and a read-only default."""
    with psycopg.connect(fault_db, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("SET default_transaction_read_only = off")
        conn.execute("UPDATE watibot.conversation SET due_at = now() WHERE claimed_by IS NULL AND due_at IS NOT NULL")


def _log(process: ServeProcess) -> str:
    return process.log_path.read_text()


def _worker_pids(process: ServeProcess) -> set[int]:
    return {worker.pid for worker in children(process)}


@pytest.mark.processes
def test_a_read_only_stretch_is_refused_with_503_and_survived_without_a_restart(
    fault_db: str, fault_sql: Sql, processes: Callable[..., ServeProcess], fake_wati: FakeWati,
) -> None:
    """Database read-only for a while: webhooks get 503 (never 500), the claim loop logs 25006 and backs off,
    /readyz says read-only; once writable again the same workers answer every acknowledged message once."""
    env = serve_environment(fault_db, fake_wati, WATIBOT_BUFFER_SECONDS="3600")
    serve = processes(env, workers=2)
    serve.wait_ready()
    pids = _worker_pids(serve)
    assert post(serve, message("50371000001", "ro-before")) == 200
    _read_only(fault_db, on=True)
    wait_until(lambda: post(serve, message("50371000002", "ro-during")) == 503, timeout=30,
               what="webhooks to be refused while read-only")
    _make_due(fault_db)
    wait_until(lambda: "claim loop iteration failed" in _log(serve) and "SQLSTATE 25006" in _log(serve),
               timeout=30, what="the claim loop to log 25006")
    readiness = httpx.get(f"{serve.url}/readyz", timeout=10)
    assert readiness.status_code == 503
    assert any("read-only" in problem for problem in readiness.json()["problems"])
    assert httpx.get(f"{serve.url}/healthz", timeout=10).status_code == 200, "a database fault is not a wedge"
    assert fake_wati.requests == []

    _read_only(fault_db, on=False)
    (sent,) = fake_wati.wait_for_sent(1, timeout=60)
    assert "ro-before" in sent["text"]
    assert post(serve, message("50371000003", "ro-after")) == 200
    _make_due(fault_db)
    fake_wati.wait_for_sent(2, timeout=60)
    wait_drained(fault_sql)
    check_invariant(fault_sql, fake_wati, {"ro-before", "ro-after"})
    assert _worker_pids(serve) == pids, "survived without a restart"
    assert "claim loop recovered after" in _log(serve)
    assert "Traceback" not in _log(serve)


@pytest.mark.processes
@pytest.mark.parametrize(("sqlstate", "meaning"), [("40P01", "deadlock_detected"), ("P0099", "never heard of")])
def test_server_errors_in_the_claim_loop_and_the_heartbeat_are_survived(
    fault_db: str, fault_sql: Sql, processes: Callable[..., ServeProcess], fake_wati: FakeWati,
    fake_agent: FakeAgent, sqlstate: str, meaning: str,
) -> None:
    """PostgreSQL raising a deadlock (or an unknown SQLSTATE) on every conversation write: webhooks get 503, both
    loops log the error once and keep trying; when it stops, the same workers answer everything exactly once."""
    release = threading.Event()
    fake_agent.default = lambda request: Answer(body=echo_reply)
    fake_agent.script = [Answer(body=echo_reply, hang_until=release)]
    env = serve_environment(fault_db, fake_wati, WATIBOT_AGENT="http", WATIBOT_AGENT_URL=fake_agent.url,
                            WATIBOT_BUFFER_SECONDS="0.3", WATIBOT_LEASE_SECONDS="9")
    serve = processes(env, workers=1)
    serve.wait_ready()
    pids = _worker_pids(serve)
    assert post(serve, message("50372000001", "held-1")) == 200
    fake_agent.wait_for(lambda arrivals: len(arrivals) >= 1, arrived=True)  # a burst in flight, heartbeat beating
    fault_sql(f"""
        CREATE FUNCTION watibot.test_fault() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'injected fault ({meaning})' USING ERRCODE = '{sqlstate}'; END $$;
        CREATE TRIGGER test_fault BEFORE INSERT OR UPDATE ON watibot.conversation
            FOR EACH ROW EXECUTE FUNCTION watibot.test_fault();
    """)
    try:
        assert post(serve, message("50372000002", "refused-1")) == 503
        with psycopg.connect(fault_db, autocommit=True) as conn:  # a due conversation for the claim loop to fail on
            conn.execute("SET session_replication_role = replica")
            conn.execute("INSERT INTO watibot.conversation (channel, customer, due_at) "
                          "VALUES ('50322220000', '50372000003', now())")
        wait_until(lambda: "claim loop iteration failed: StatementFailed" in _log(serve)
                   and "heartbeat loop iteration failed: StatementFailed" in _log(serve),
                   timeout=30, what="both loops to log the injected error")
        wait_until(lambda: _log(serve).count(f"SQLSTATE {sqlstate}") >= 2, timeout=30, what="the log lines")
        assert httpx.get(f"{serve.url}/healthz", timeout=10).status_code == 200
    finally:
        fault_sql("DROP TRIGGER test_fault ON watibot.conversation; DROP FUNCTION watibot.test_fault()")
    wait_until(lambda: "heartbeat loop recovered after" in _log(serve), timeout=30, what="the heartbeat to recover")
    wait_until(lambda: "claim loop recovered after" in _log(serve), timeout=30, what="the claim loop to recover")
    release.set()
    assert post(serve, message("50372000002", "retried-1")) == 200  # WATI's retry of the refused one (new text)
    fake_wati.wait_for_sent(2, timeout=60)
    wait_drained(fault_sql)
    check_invariant(fault_sql, fake_wati, {"held-1", "retried-1"})
    assert fault_sql("SELECT attempts FROM watibot.burst WHERE prompt LIKE 'held-1%'") == [(1,)], \
        "the held burst kept its lease through the heartbeat's failures"
    log = _log(serve)
    for loop in ("claim", "heartbeat"):
        repeated = [line for line in log.splitlines() if f"{loop} loop iteration failed" in line]
        assert len(repeated) == 1, f"one line per distinct error, not per iteration: {repeated}"
    assert _worker_pids(serve) == pids, "survived without a restart"
