"""Workers added and removed while `watibot serve` runs (uvicorn's SIGTTIN / SIGTTOU on the serve parent).

A new worker starts its own sweeper and claims; a removed one gets SIGTERM, stops claiming, lets its bursts in
flight finish within the grace period and hands the rest back. Under load, nothing is lost or answered twice.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import ServeProcess, children, holders, serve_environment, wait_until
from tests.fakes import Answer, FakeAgent, FakeWati, echo_reply
from tests.invariants import Load, check_invariant, wait_drained

pytestmark = pytest.mark.processes
Sql = Callable[..., list[tuple[Any, ...]]]


def _owners(sql: Sql) -> set[int]:
    """Pids of workers that began a burst (from the owner ids recorded on the bursts' conversations' claims)."""
    return {int(owner.split(":")[1]) for (owner,) in sql("SELECT DISTINCT owner FROM watibot.burst_owner_seen")}


def test_workers_added_and_removed_under_load_lose_and_duplicate_nothing(
    fault_db: str, fault_sql: Sql, processes: Callable[..., ServeProcess], fake_wati: FakeWati,
    fake_agent: FakeAgent,
) -> None:
    """SIGTTIN adds a worker that claims work; two SIGTTOUs remove workers holding bursts slower than the grace
    period (handed back, taken at once); every acknowledged message is answered exactly once."""
    # Every worker's slots stay full of bursts the agent takes 3 s over, six times the grace period: each removed
    # worker holds bursts it cannot finish in time, whichever moment the signal comes.
    fake_agent.default = lambda request: Answer(body=echo_reply, delay=3.0)
    env = serve_environment(fault_db, fake_wati, WATIBOT_AGENT="http", WATIBOT_AGENT_URL=fake_agent.url,
                            WATIBOT_BUFFER_SECONDS="0.3", WATIBOT_SHUTDOWN_GRACE_SECONDS="0.5",
                            WATIBOT_CONCURRENCY="8")
    serve = processes(env, workers=2)
    serve.wait_ready()
    fault_sql("""
        CREATE TABLE watibot.burst_owner_seen (owner text PRIMARY KEY);
        CREATE FUNCTION watibot.record_owner() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.claimed_by IS NOT NULL THEN
                INSERT INTO watibot.burst_owner_seen VALUES (NEW.claimed_by) ON CONFLICT DO NOTHING;
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER record_owner AFTER UPDATE OF claimed_by ON watibot.conversation
            FOR EACH ROW EXECUTE FUNCTION watibot.record_owner();
    """)
    first = {worker.pid for worker in children(serve)}
    assert len(first) == 2
    with Load(serve.url, customers=60, rate=40, total=800, prefix="scale") as load:
        wait_until(lambda: len(load.result.acknowledged) >= 100, timeout=60, what="load to start")
        serve.process.send_signal(signal.SIGTTIN)
        added = wait_until(lambda: {w.pid for w in children(serve)} - first, timeout=60, what="a third worker")
        wait_until(lambda: added <= _owners(fault_sql), timeout=60, what="the new worker to claim")
        removed_before = {w.pid for w in children(serve)}
        for _ in range(2):
            workers = {w.pid for w in children(serve)}
            fewer = len(workers) - 1
            wait_until(lambda pids=workers: pids <= set(holders(fault_sql)), timeout=60,  # type: ignore[misc]
                       what="every worker to hold bursts")
            serve.process.send_signal(signal.SIGTTOU)
            wait_until(lambda left=fewer: len(children(serve)) == left, timeout=60,  # type: ignore[misc]
                       what="a worker to be removed")
        result = load.wait_done(timeout=120)
    remaining = {w.pid for w in children(serve)}
    assert len(remaining) == 1
    removed = removed_before - remaining
    assert len(removed) == 2
    wait_drained(fault_sql, timeout=120)
    counts = check_invariant(fault_sql, fake_wati, result.acknowledged)
    # A webhook sent on a keep-alive connection just as the removed worker closes it sees the connection reset
    # (HTTP/1.1's race; nothing acknowledged, WATI retries): allowed. An HTTP error is not.
    answered_errors = {outcome: n for outcome, n in result.refused.items() if outcome.startswith("HTTP")}
    assert not answered_errors, f"scaling answered no webhook with an error: {dict(result.refused)}"
    log = serve.log_path.read_text()
    handed_back = log.count("handed the claim back")
    taken_over = log.count("took over from")
    assert taken_over == 0, "removed workers finished or handed back; none left a lease to expire"
    assert fault_sql("SELECT status, count(*) FROM watibot.burst WHERE status <> 'sent' OR attempts <> 1 "
                     "GROUP BY status") == [], "no send was cut (attention) and no lease had to expire"
    assert handed_back >= 2, "each removed worker handed back the bursts it could not finish in the grace period"
    print(f"\nscaling 2 -> 3 -> 1 workers under load: {len(result.acknowledged)} acknowledged, refused "
          f"{dict(result.refused)}, {handed_back} claims handed back by removed workers, {taken_over} lease "
          f"takeovers; {counts}")
