"""Fault suite: real `watibot serve` process trees, a PostgreSQL cluster this module owns (stopped and restarted
by the tests), a fake WATI and a fake agent. After every scenario: no acknowledged message lost, no reply twice.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import ServeProcess, children, holders, post, serve_environment, wait_until
from tests.fakes import Answer, FakeAgent, FakeWati, echo_reply
from tests.invariants import Load, check_invariant, kill_the_busiest_worker, message, wait_drained
from watibot.embedded import EmbeddedCluster

pytestmark = pytest.mark.processes
Sql = Callable[..., list[tuple[Any, ...]]]


def test_kill_9_of_a_worker_holding_bursts_is_completed_by_another_after_the_lease(
    processes: Callable[..., ServeProcess], fault_db: str, fault_sql: Sql, fake_wati: FakeWati,
    fake_agent: FakeAgent,
) -> None:
    """kill -9 of a worker in the middle of its bursts: after the lease expires another worker answers them once."""
    env = serve_environment(fault_db, fake_wati, WATIBOT_AGENT="http", WATIBOT_AGENT_URL=fake_agent.url,
                            WATIBOT_LEASE_SECONDS="3", WATIBOT_BUFFER_SECONDS="0.3")
    serve = processes(env, workers=2)
    serve.wait_ready()
    report = kill_the_busiest_worker(serve, fault_sql, fake_wati, fake_agent, prefix="k")
    print(f"\nkill -9: worker held {report.held} bursts; all answered {report.recovery_seconds:.1f} s after the kill "
          f"(lease 3 s); {report.counts}")


def test_paused_worker_past_its_lease_neither_sends_nor_completes_when_resumed(
    processes: Callable[..., ServeProcess], fault_db: str, fault_sql: Sql, fake_wati: FakeWati,
    fake_agent: FakeAgent,
) -> None:
    """SIGSTOP a host's worker past its lease, let another host take over, SIGCONT it: it is fenced out."""
    release = threading.Event()
    fake_agent.default = lambda request: Answer(body=echo_reply)
    fake_agent.script = [Answer(body={"reply": "STALE REPLY"}, hang_until=release)]
    env = serve_environment(fault_db, fake_wati, WATIBOT_AGENT="http", WATIBOT_AGENT_URL=fake_agent.url,
                            WATIBOT_LEASE_SECONDS="3", WATIBOT_BUFFER_SECONDS="0.2")
    host_a, host_b = processes(env), processes(env)
    host_a.wait_ready()
    host_b.wait_ready()
    assert post(host_a, message("50376819621", "pause-1")) == 200
    fake_agent.wait_for(lambda arrivals: len(arrivals) >= 1, arrived=True)
    (holder_pid,) = holders(fault_sql)
    paused = host_a if holder_pid == host_a.process.pid else host_b
    os.kill(holder_pid, signal.SIGSTOP)
    try:
        (sent,) = fake_wati.wait_for_sent(1, timeout=30)
        assert sent["text"] == "Received:\n1. pause-1"
        wait_drained(fault_sql)
    finally:
        release.set()  # the paused worker's agent call now returns its (stale) reply
        os.kill(holder_pid, signal.SIGCONT)
    wait_until(lambda: "lost the claim" in paused.log_path.read_text()
               or "lease lost" in paused.log_path.read_text(), timeout=30, what="the resumed worker to notice")
    assert len(fake_wati.requests) == 1, "the resumed worker sent nothing"
    assert fault_sql("SELECT status, fence, attempts FROM watibot.burst") == [("sent", 2, 2)]
    check_invariant(fault_sql, fake_wati, {"pause-1"})


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_database_restart_under_webhook_load_loses_nothing_acknowledged(
    processes: Callable[..., ServeProcess], fault_cluster: EmbeddedCluster, fault_db: str, fault_sql: Sql,
    fake_wati: FakeWati, mode: str,
) -> None:
    """PostgreSQL restarted during webhook load: every 200 is stored, /readyz shows the outage, service recovers."""
    env = serve_environment(fault_db, fake_wati, WATIBOT_BUFFER_SECONDS="0.5", WATIBOT_DB_TIMEOUT_SECONDS="2")
    serve = processes(env, workers=2)
    serve.wait_ready()
    with Load(serve.url, customers=40, rate=150, total=1200) as load:
        wait_until(lambda: len(load.result.acknowledged) >= 150, timeout=30, what="load to start")
        fault_cluster.stop(mode)
        stopped_at = time.monotonic()
        outage_readiness = httpx.get(f"{serve.url}/readyz", timeout=10)
        fault_cluster.start()
        restarted_at = time.monotonic()
        result = load.wait_done()
    assert outage_readiness.status_code == 503
    assert "database unavailable" in outage_readiness.json()["problems"]
    wait_until(lambda: httpx.get(f"{serve.url}/readyz").status_code == 200, timeout=30, what="readiness again")
    assert post(serve, message("50379999999", f"after-{mode}")) == 200
    result.acknowledged.add(f"after-{mode}")
    wait_drained(fault_sql)
    counts = check_invariant(fault_sql, fake_wati, result.acknowledged)
    refused = sum(result.refused.values())
    assert refused > 0, "the outage was visible to the sender as non-200"
    assert set(result.refused) <= {"HTTP 503"}, f"an outage is a 503, nothing else: {dict(result.refused)}"
    refusing = (result.last_failure or 0) - (result.first_failure or 0)
    print(f"\nrestart ({mode}): sent {result.sent}, acknowledged {len(result.acknowledged)}, refused {refused} "
          f"{dict(result.refused)}; database down {restarted_at - stopped_at:.1f} s; webhooks refused for "
          f"{refusing:.1f} s; {counts}")


def test_serve_waits_for_a_database_that_appears_later(
    processes: Callable[..., ServeProcess], fault_cluster: EmbeddedCluster, fault_db: str, fake_wati: FakeWati,
) -> None:
    """serve started while PostgreSQL is down says so, retries with backoff, and starts once it is up."""
    fault_cluster.stop("fast")
    serve = processes(serve_environment(fault_db, fake_wati, WATIBOT_DB_STARTUP_TIMEOUT_SECONDS="60"))
    wait_until(lambda: "database not reachable" in serve.log_path.read_text(), timeout=30,
               what="the retry message")
    assert serve.process.poll() is None, "still retrying, not exited"
    fault_cluster.start()
    serve.wait_ready(timeout=60)
    assert post(serve, message("50376819621", "late-start")) == 200


def test_wati_refusing_connections_is_retried_then_dead_with_the_reason(
    processes: Callable[..., ServeProcess], fault_db: str, fault_sql: Sql,
) -> None:
    """WATI unreachable (connection refused): retried per policy, then the burst is dead saying why."""
    from tests.conftest import free_port

    env = serve_environment(fault_db, None, WATIBOT_WATI_API_URL=f"http://127.0.0.1:{free_port()}/1234",
                            WATIBOT_MAX_ATTEMPTS="3", WATIBOT_RETRY_BASE_SECONDS="0.1")
    serve = processes(env)
    serve.wait_ready()
    assert post(serve, message("50376819621", "refused-1")) == 200
    (row,) = wait_until(lambda: fault_sql("SELECT attempts, error FROM watibot.burst WHERE status = 'dead'"),
                        timeout=30)
    assert row[0] == 3
    assert "WATI not reachable" in row[1]


def test_agent_timeout_is_retried_like_a_failure(
    processes: Callable[..., ServeProcess], fault_db: str, fault_sql: Sql, fake_wati: FakeWati,
    fake_agent: FakeAgent,
) -> None:
    """An agent slower than its timeout counts as a failed attempt; the retry's answer is sent once."""
    release = threading.Event()
    fake_agent.default = lambda request: Answer(body=echo_reply)
    fake_agent.script = [Answer(hang_until=release)]
    env = serve_environment(fault_db, fake_wati, WATIBOT_AGENT="http", WATIBOT_AGENT_URL=fake_agent.url,
                            WATIBOT_AGENT_TIMEOUT_SECONDS="1", WATIBOT_RETRY_BASE_SECONDS="0.1")
    serve = processes(env)
    serve.wait_ready()
    try:
        assert post(serve, message("50376819621", "slow-agent")) == 200
        fake_wati.wait_for_sent(1, timeout=30)
    finally:
        release.set()
    wait_drained(fault_sql)
    assert fault_sql("SELECT status, attempts FROM watibot.burst") == [("sent", 2)]
    check_invariant(fault_sql, fake_wati, {"slow-agent"})


def test_sigterm_lets_bursts_in_flight_finish_within_the_grace_period(
    processes: Callable[..., ServeProcess], fault_db: str, fault_sql: Sql, fake_wati: FakeWati,
    fake_agent: FakeAgent,
) -> None:
    """SIGTERM while the agent is working: no new claims, and the bursts in flight are answered before exit."""
    fake_agent.default = lambda request: Answer(body=echo_reply, delay=1.0)
    env = serve_environment(fault_db, fake_wati, WATIBOT_AGENT="http", WATIBOT_AGENT_URL=fake_agent.url,
                            WATIBOT_SHUTDOWN_GRACE_SECONDS="10")
    serve = processes(env)
    serve.wait_ready()
    for customer in range(3):
        assert post(serve, message(f"5037000010{customer}", f"term-{customer}")) == 200
    fake_agent.wait_for(lambda arrivals: len(arrivals) >= 3, arrived=True)
    serve.process.send_signal(signal.SIGTERM)
    assert serve.process.wait(30) == 0
    assert len(fake_wati.sent) == 3
    wait_drained(fault_sql, timeout=5)
    check_invariant(fault_sql, fake_wati, {f"term-{customer}" for customer in range(3)})


def test_sigterm_hands_back_claims_that_outlast_the_grace_period(
    processes: Callable[..., ServeProcess], fault_db: str, fault_sql: Sql, fake_wati: FakeWati,
    fake_agent: FakeAgent,
) -> None:
    """Bursts still with the agent when the grace period ends are handed back and taken at once, not after the lease."""
    release = threading.Event()
    fake_agent.default = lambda request: Answer(body=echo_reply)
    fake_agent.script = [Answer(body=echo_reply, hang_until=release)
                         for _ in range(2)]
    env = serve_environment(fault_db, fake_wati, WATIBOT_AGENT="http", WATIBOT_AGENT_URL=fake_agent.url,
                            WATIBOT_SHUTDOWN_GRACE_SECONDS="1", WATIBOT_LEASE_SECONDS="60")
    first = processes(env)
    first.wait_ready()
    for customer in range(2):
        assert post(first, message(f"5037000020{customer}", f"handback-{customer}")) == 200
    fake_agent.wait_for(lambda arrivals: len(arrivals) >= 2, arrived=True)
    second = processes(env)
    second.wait_ready()
    terminated_at = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    try:
        fake_wati.wait_for_sent(2, timeout=30)
    finally:
        release.set()
    taken_after = time.monotonic() - terminated_at
    assert taken_after < 30, "taken over at once, not after the 60 s lease"
    assert first.process.wait(30) == 0
    wait_drained(fault_sql)
    assert fault_sql("SELECT status, attempts FROM watibot.burst ORDER BY id") == [("sent", 1), ("sent", 1)]
    check_invariant(fault_sql, fake_wati, {"handback-0", "handback-1"})


def test_soak_with_worker_kills_wati_errors_and_a_database_restart(
    processes: Callable[..., ServeProcess], fault_cluster: EmbeddedCluster, fault_db: str, fault_sql: Sql,
    fake_wati: FakeWati,
) -> None:
    """Bounded soak: many customers, random worker kills, WATI errors and a database restart; the invariant holds."""
    seconds = float(os.environ.get("WATIBOT_SOAK_SECONDS", "45"))
    rng = random.Random(7)
    fake_wati.default = lambda request: Answer(status=500) if rng.random() < 0.1 else Answer()
    env = serve_environment(fault_db, fake_wati, WATIBOT_BUFFER_SECONDS="0.5", WATIBOT_LEASE_SECONDS="3",
                            WATIBOT_RETRY_BASE_SECONDS="0.2", WATIBOT_MAX_ATTEMPTS="8")
    serve = processes(env, workers=3)
    serve.wait_ready()
    rate = 60.0
    kills = restarts = 0
    with Load(serve.url, customers=80, rate=rate, total=int(rate * seconds), prefix="s") as load:
        started = time.monotonic()
        next_kill = started + 5
        restarted = False
        while time.monotonic() - started < seconds and load._thread.is_alive():
            now = time.monotonic()
            if now >= next_kill:
                workers = children(serve)
                if workers:
                    rng.choice(workers).kill()
                    kills += 1
                next_kill = now + rng.uniform(4, 8)
            if not restarted and now - started > seconds / 2:
                fault_cluster.stop("fast")
                fault_cluster.start()
                restarted = True
                restarts += 1
            time.sleep(0.2)  # the chaos schedule's tick, not synchronisation
        result = load.wait_done(timeout=seconds + 60)
    wait_drained(fault_sql, timeout=120)
    counts = check_invariant(fault_sql, fake_wati, result.acknowledged)
    print(f"\nsoak {seconds:.0f} s: {kills} worker kills, {restarts} database restart, "
          f"{len(fake_wati.requests) - len(fake_wati.sent)} WATI errors; sent {result.sent}, "
          f"refused {dict(result.refused)}; {counts}")
    assert "HTTP 500" not in result.refused, "faults are answered 503 or drop the connection, never 500"
