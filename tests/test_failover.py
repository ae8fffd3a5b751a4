"""Failover to a real hot standby under webhook load, without restarting the service.

Two embedded clusters: a primary and a synchronous standby made by pg_basebackup (tests/standby.py says how
and why). `watibot serve` (2 workers) reaches PostgreSQL through a TCP proxy, the stand-in for a virtual IP or
a DNS name. While webhooks arrive, the failover runs in one of two orders, neither of them kind:

- move-then-crash: the address is moved to the standby while it is still read-only (writes fail with SQLSTATE
  25006), then the primary crashes (`pg_ctl stop -m immediate`), then the standby is promoted;
- crash-then-move: the primary crashes in the middle of the load (what synchronous replication is for: commits
  it acknowledged a millisecond before dying must be on the standby), then the address moves to the standby
  while it is still read-only, then the standby is promoted.

The same processes must recover by themselves; afterwards every acknowledged message is on the promoted
standby and answered exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServeProcess, children, post, serve_environment, wait_until
from tests.fakes import FakeWati
from tests.invariants import Load, check_invariant, message, wait_drained
from tests.netfaults import TcpProxy
from tests.standby import in_recovery, promote, query, replicated_pair, replication
from watibot.embedded import EmbeddedCluster

pytestmark = pytest.mark.processes
Pair = tuple[EmbeddedCluster, EmbeddedCluster]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """A primary with the watibot schema and its synchronous hot standby; both stopped after the test."""
    with replicated_pair(tmp_path / "clusters") as clusters:
        yield clusters


@pytest.fixture
def proxy(pair: Pair) -> Iterator[TcpProxy]:
    """The service's address of the database: the primary's until the test moves it."""
    with TcpProxy(pair[0].port) as forwarding:
        yield forwarding


def _readiness(url: str) -> tuple[int, Any]:
    try:
        response = httpx.get(f"{url}/readyz", timeout=5)
    except httpx.HTTPError as error:
        return 0, type(error).__name__
    return response.status_code, response.json()


@dataclass
class Timeline:
    """What the test saw at each step of the failover, for the assertions and the report."""

    acknowledged_by_primary: int = 0
    acknowledged_in_last_second: int = 0
    acknowledged_while_read_only: int = 0
    acknowledged_before_promotion: int = 0
    failover_began_at: float = 0.0
    read_only_refusals: int = 0
    readiness_while_read_only: tuple[int, Any] = (0, None)
    address_moved_at: float = 0.0
    crashed_at: float = 0.0
    promote_took: float = 0.0
    promoted_at: float = 0.0
    first_200_after: float = 0.0
    ready_after: float = 0.0


def _move_address(load: Load, proxy: TcpProxy, standby: EmbeddedCluster, seen: Timeline) -> None:
    """Point the proxy at the standby still in recovery; wait for a stretch of 25006 refusals (300 at 100/s)."""
    proxy.retarget(standby.port)
    seen.address_moved_at = time.monotonic()
    refused_before = load.result.refused["HTTP 503"]
    wait_until(lambda: load.result.refused["HTTP 503"] >= refused_before + 50, timeout=30,
               what="webhooks refused while the address reaches a read-only standby")
    seen.acknowledged_while_read_only = len(load.result.acknowledged)
    wait_until(lambda: load.result.refused["HTTP 503"] >= refused_before + 300, timeout=30,
               what="a stretch of refusals by the read-only standby")
    seen.read_only_refusals = load.result.refused["HTTP 503"] - refused_before
    seen.readiness_while_read_only = _readiness(load.url)


def _crash(primary: EmbeddedCluster, seen: Timeline) -> None:
    """`pg_ctl stop -m immediate` of the primary: no shutdown checkpoint, connections cut mid-statement."""
    primary.stop("immediate")
    seen.crashed_at = time.monotonic()


@pytest.mark.parametrize("order", ["move-then-crash", "crash-then-move"])
def test_failover_to_a_synchronous_standby_loses_no_acknowledged_message_and_sends_no_second_reply(
    pair: Pair, proxy: TcpProxy, fake_wati: FakeWati, processes: Callable[..., ServeProcess], order: str,
) -> None:
    """Failover under load (address moved to the read-only standby, primary crashed, standby promoted, in either
    order): only 503s, the same processes recover, every 200 is on the promoted standby and answered once."""
    # (`processes` comes last so that serve is stopped first, before the proxy and the clusters it uses.)
    primary, standby = pair
    assert replication(primary) == [("standby1", "streaming", "sync")]

    def sql(statement: str, *params: Any) -> list[tuple[Any, ...]]:
        return query(standby.url(), statement, *params)

    env = serve_environment(proxy.url(primary.url()), fake_wati, WATIBOT_DB_TIMEOUT_SECONDS="2",
                            WATIBOT_BUFFER_SECONDS="0.5", WATIBOT_LEASE_SECONDS="5")
    serve = processes(env, workers=2)
    serve.wait_ready()
    workers = wait_until(lambda: {worker.pid for worker in children(serve)} if len(children(serve)) == 2 else None,
                         timeout=30, what="two workers")
    seen = Timeline()

    with Load(serve.url, customers=40, rate=100, total=1200, prefix="f") as load:
        # Normal operation first: messages stored and replies going out through the primary.
        wait_until(lambda: len(load.result.acknowledged) >= 200 and len(fake_wati.sent) >= 20, timeout=30,
                   what="load and replies on the primary")
        # ... and another 100 acknowledged (about a second's worth) right before the failover starts: with a
        # crash first, these are commits the primary acknowledged just before it died.
        last_second_from = len(load.result.acknowledged)
        wait_until(lambda: len(load.result.acknowledged) >= last_second_from + 100, timeout=30,
                   what="a last second of acknowledged load")
        seen.acknowledged_by_primary = len(load.result.acknowledged)
        seen.acknowledged_in_last_second = seen.acknowledged_by_primary - last_second_from

        seen.failover_began_at = time.monotonic()
        if order == "move-then-crash":
            _move_address(load, proxy, standby, seen)
            _crash(primary, seen)
        else:
            _crash(primary, seen)
            _move_address(load, proxy, standby, seen)
        # Once the standby in recovery refuses writes, nothing is acknowledged until it is promoted. (The 200s
        # counted between the start of the failover and that point answer commits the primary made before it
        # was cut off or died: the invariant below finds each of them on the promoted standby.)
        seen.acknowledged_before_promotion = len(load.result.acknowledged)
        assert seen.acknowledged_before_promotion == seen.acknowledged_while_read_only, "a 200 from a standby"
        promote_started = time.monotonic()
        promote(standby)
        seen.promoted_at = time.monotonic()
        seen.promote_took = seen.promoted_at - promote_started
        assert not in_recovery(standby)

        # The same processes recover by themselves.
        wait_until(lambda: len(load.result.acknowledged) > seen.acknowledged_before_promotion, timeout=30,
                   what="the first 200 after promotion")
        seen.first_200_after = time.monotonic() - seen.promoted_at
        wait_until(lambda: _readiness(serve.url)[0] == 200, timeout=30, what="readiness after promotion")
        seen.ready_after = time.monotonic() - seen.promoted_at
        result = load.wait_done()

    assert serve.process.poll() is None, "serve is still running"
    assert {worker.pid for worker in children(serve)} == workers, "the same workers, none restarted"
    assert post(serve, message("50379999999", "after-failover")) == 200
    result.acknowledged.add("after-failover")

    wait_drained(sql, timeout=60)
    counts = check_invariant(sql, fake_wati, result.acknowledged)

    # A read-only standby, a crashed primary and connections cut by the address move all mean "not known to be
    # stored, retry later": a 503, never a 500, and never a dropped HTTP connection (the service stays up).
    assert set(result.refused) == {"HTTP 503"}, f"refusals other than 503: {dict(result.refused)}"
    assert seen.read_only_refusals >= 300
    # Readiness says why webhooks are refused while the address reaches a standby still in recovery.
    status, body = seen.readiness_while_read_only
    assert status == 503, f"/readyz while the database is read-only: {status} {body}"
    assert any("read-only" in problem for problem in body["problems"]), body
    refused = sum(result.refused.values())
    refusing = (result.last_failure or 0) - (result.first_failure or 0)
    log = serve.log_path.read_text()
    # A burst whose send outcome a taker cannot know is closed as `attention`, never re-sent (the invariant
    # allows it at most one reply); list them with whether WATI did accept their reply.
    accepted = {send["local_message_id"] for send in fake_wati.sent}
    attention = [f"{burst_id} {'sent' if str(burst_id) in accepted else 'not sent'}" for (burst_id,) in
                 sql("SELECT id FROM watibot.burst WHERE status = 'attention' ORDER BY id")]
    print(
        f"\nfailover ({order}): sent {result.sent}, acknowledged {len(result.acknowledged)} "
        f"({seen.acknowledged_in_last_second} in the last second before the failover began, "
        f"{seen.acknowledged_before_promotion - seen.acknowledged_by_primary} answered after it began), refused {refused} "
        f"{dict(result.refused)}, {seen.read_only_refusals} of them by the read-only standby; refusing for "
        f"{refusing:.1f} s; failover began {seen.promoted_at - seen.failover_began_at:.1f} s before promotion (address "
        f"moved {seen.promoted_at - seen.address_moved_at:.1f} s, crash {seen.promoted_at - seen.crashed_at:.1f} s "
        f"before); promote took {seen.promote_took:.1f} s, first 200 {seen.first_200_after:.2f} s and "
        f"/readyz 200 {seen.ready_after:.2f} s after it; /readyz while read-only: {status} {body}; "
        f"log lines with 25006: {log.count('25006')}, tracebacks: {log.count('Traceback')}; "
        f"bursts needing attention {len(attention)} {attention}; lost {counts['acknowledged_but_lost']}, duplicate replies "
        f"{counts['duplicate_replies']}; {counts}"
    )
