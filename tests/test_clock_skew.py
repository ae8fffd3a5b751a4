"""Hosts whose clocks are minutes off change nothing: every lease, due time and window comes from the database clock.

Two `watibot serve` trees share one PostgreSQL, one running 10 minutes ahead and one 10 minutes behind (Debian's
libfaketime, preloaded into the whole process tree). Bursts are answered one window after their first message,
long bursts keep their leases through heartbeats, nobody takes anything over, and the times a host records (when
the agent was called) are on the database clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServeProcess, post, serve_environment
from tests.fakes import Answer, FakeAgent, FakeWati, echo_reply
from tests.invariants import check_invariant, message, wait_drained

pytestmark = pytest.mark.processes
Sql = Callable[..., list[tuple[Any, ...]]]
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
WINDOW = 2.0
LEASE = 3.0


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="libfaketime not installed (apt-get install faketime; .ci/run does)")
def test_hosts_ten_minutes_ahead_and_behind_answer_on_time_and_keep_their_leases(
    fault_db: str, fault_sql: Sql, processes: Callable[..., ServeProcess], fake_wati: FakeWati,
    fake_agent: FakeAgent,
) -> None:
    """With host clocks +10 and -10 minutes off, each burst is answered about one window after its first message,
    an agent slower than the lease keeps its claim, and recorded agent start times agree with the database."""
    slow = "slow-1"
    fake_agent.default = lambda request: Answer(
        body=echo_reply, delay=LEASE + 1.5 if any(m["text"] == slow for m in request["json"]["messages"]) else 0.0)
    hosts = []
    for offset in ("+10m", "-10m"):
        env = serve_environment(
            fault_db, fake_wati, WATIBOT_HOST_NAME=f"skewed{offset}", WATIBOT_AGENT="http",
            WATIBOT_AGENT_URL=fake_agent.url, WATIBOT_BUFFER_SECONDS=str(WINDOW), WATIBOT_LEASE_SECONDS=str(LEASE),
            LD_PRELOAD=str(LIBFAKETIME), FAKETIME=offset, FAKETIME_DONT_RESET="1",
        )
        hosts.append(processes(env, workers=1))
    for host in hosts:
        host.wait_ready()
    skew = fault_sql("SELECT 1")  # the test's own connection: the database clock is the real one
    assert skew == [(1,)]

    posted: dict[str, float] = {}
    acknowledged = set()
    for customer in range(6):
        host = hosts[customer % 2]
        first = f"c{customer}-a"
        posted[first] = time.monotonic()
        for text in (first, f"c{customer}-b"):
            assert post(host, message(f"503760000{customer:02d}", text)) == 200
            acknowledged.add(text)
    posted[slow] = time.monotonic()
    assert post(hosts[0], message("50376100000", slow)) == 200
    acknowledged.add(slow)

    fake_wati.wait_for_sent(7, timeout=60)
    wait_drained(fault_sql)
    counts = check_invariant(fault_sql, fake_wati, acknowledged)
    lateness = {}
    for request in fake_wati.requests:
        text = request["query"].get("messageText") or ""
        for first, at in posted.items():
            if f". {first}" in text:
                lateness[first] = request["received"] - at
    for first, late in lateness.items():
        expected_floor = WINDOW - 0.5
        ceiling = WINDOW + 15 + (LEASE + 1.5 if first == slow else 0)
        assert expected_floor <= late <= ceiling, f"{first} answered {late:.1f} s after it was posted"
    assert len(lateness) == 7
    assert fault_sql("SELECT count(*) FROM watibot.burst WHERE attempts <> 1") == [(0,)], "nothing taken over"
    assert not any("took over" in host.log_path.read_text() for host in hosts)
    worst = fault_sql("""
        SELECT max(abs(EXTRACT(EPOCH FROM agent_started_at - started_at)))::float8 FROM watibot.burst
    """)[0][0]
    assert worst < 5.0, f"agent_started_at is {worst:.0f} s off the database clock"
    print(f"\nclock skew +10 min / -10 min: reply {min(lateness.values()):.1f}-{max(lateness.values()):.1f} s after "
          f"the first message (window {WINDOW:g} s; the slow agent {LEASE + 1.5:g} s > lease {LEASE:g} s kept its "
          f"claim); agent_started_at within {worst:.2f} s of the database clock; {counts}")
