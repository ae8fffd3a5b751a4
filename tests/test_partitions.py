"""Several hosts on one PostgreSQL, and one of them cut off by a network partition.

Each host is a real `watibot serve` tree with its own host name (`WATIBOT_HOST_NAME`) whose connections to
PostgreSQL (and, for a total partition, to the agent and WATI) go through its own `netfaults.TcpProxy`. A cut is a
blackhole: no bytes, no FIN, no RST, new connections accepted and held; when it heals, what TCP held is
delivered late. After each fault: every message acknowledged with 200 is answered exactly once, no second reply,
nothing answered that was not received.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import ServeProcess, holders, post, serve_environment, wait_until
from tests.fakes import Answer, FakeAgent, FakeWati, echo_reply
from tests.invariants import check_invariant, message, wait_drained
from tests.netfaults import TcpProxy
from watibot.embedded import EmbeddedCluster

pytestmark = pytest.mark.processes
Sql = Callable[..., list[tuple[Any, ...]]]
LEASE = 3.0


@dataclass
class Host:
    """One simulated host: a serve tree and the links it reaches the world through."""

    name: str
    serve: ServeProcess
    database: TcpProxy
    outside: list[TcpProxy] = field(default_factory=list)  # agent and WATI links, for a total partition

    @property
    def links(self) -> list[TcpProxy]:
        return [self.database, *self.outside]

    def log(self) -> str:
        return self.serve.log_path.read_text()

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.serve.url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False


@pytest.fixture
def hosts(processes: Callable[..., ServeProcess], fault_cluster: EmbeddedCluster, fault_db: str,
          fake_wati: FakeWati, fake_agent: FakeAgent) -> Iterator[Callable[..., Host]]:
    """Start hosts on the fault database; `total=True` also routes the agent and WATI through cuttable links."""
    proxies: list[TcpProxy] = []

    def start(name: str, *, total: bool = False, workers: int = 1) -> Host:
        database = TcpProxy(fault_cluster.port).start()
        proxies.append(database)
        agent_url, wati_url, outside = fake_agent.url, fake_wati.api_url, []
        if total:
            outside = [TcpProxy(fake_agent.port).start(), TcpProxy(fake_wati.port).start()]
            proxies.extend(outside)
            agent_url, wati_url = outside[0].url(fake_agent.url), outside[1].url(fake_wati.api_url)
        env = serve_environment(
            database.url(fault_db), fake_wati, WATIBOT_HOST_NAME=name, WATIBOT_AGENT="http",
            WATIBOT_AGENT_URL=agent_url, WATIBOT_WATI_API_URL=wati_url, WATIBOT_LEASE_SECONDS=str(LEASE),
            WATIBOT_WATI_TIMEOUT_SECONDS="2", WATIBOT_DB_TIMEOUT_SECONDS="2", WATIBOT_BUFFER_SECONDS="0.3",
        )
        host = Host(name, processes(env, workers=workers), database, outside)
        host.serve.wait_ready()
        return host

    yield start
    for proxy in proxies:
        proxy.heal()  # let the serve trees stop cleanly
    for proxy in proxies:
        proxy.stop()


def _hold_first_calls(fake_agent: FakeAgent, count: int, reply: str) -> threading.Event:
    """The agent's first `count` calls hang until the returned event is set, then answer `reply`."""
    release = threading.Event()
    fake_agent.default = lambda request: Answer(body=echo_reply)
    fake_agent.script = [Answer(body={"reply": reply}, hang_until=release) for _ in range(count)]
    return release


def _held_by(sql: Sql, host: Host) -> int:
    return sum(len(customers) for pid, customers in holders(sql).items() if pid in host_pids(host))


def host_pids(host: Host) -> set[int]:
    """The pids that run a host's sweepers (the serve process itself when it has one worker)."""
    from tests.conftest import children

    return {host.serve.process.pid, *(worker.pid for worker in children(host.serve))}


def _answered_at(fake_wati: FakeWati, prefix: str) -> float:
    """When the last accepted reply to messages whose texts start with `prefix` reached WATI (monotonic)."""
    times = [request["received"] for request in fake_wati.requests
             if request["status"] == 200 and f". {prefix}" in (request["query"].get("messageText") or "")]
    assert times, f"no reply to {prefix}*"
    return max(times)


def _stored_late(sql: Sql, host: Host) -> int:
    """Webhooks refused by a cut-off host whose statement, held by the cut, committed after the heal."""
    return int(sql("SELECT count(*) FROM watibot.message WHERE text LIKE %s", f"cut-{host.name}-%")[0][0])


def _heal_and_rejoin(host: Host, links: list[TcpProxy], sql: Sql, wati: FakeWati, acknowledged: set[str],
                     text: str) -> tuple[float, dict[str, int]]:
    """Heal `links`, wait until the host is ready, have it take a new message, drain and check the invariant;
    returns seconds from the heal to readiness and the invariant's counts."""
    for link in links:
        link.heal()
    healed_at = time.monotonic()
    wait_until(host.ready, timeout=60, what=f"{host.name} to be ready again")
    rejoined = time.monotonic() - healed_at
    assert post(host.serve, message("50373000001", text)) == 200
    acknowledged.add(text)
    wait_drained(sql)
    return rejoined, check_invariant(sql, wati, acknowledged)


def _post_during_cut(host: Host, number: int) -> list[int]:
    """Webhooks sent to a cut-off host: their statuses (none may be 200)."""
    return [post(host.serve, message(f"50379{number:06d}", f"cut-{host.name}-{number}-{n}"), timeout=20)
            for n in range(3)]


def test_a_host_cut_off_from_postgresql_mid_burst_is_taken_over_and_fenced_out(
    hosts: Callable[..., Host], fault_sql: Sql, fake_wati: FakeWati, fake_agent: FakeAgent,
) -> None:
    """Host A loses PostgreSQL (blackhole) while its agent works, and keeps the agent and WATI: host B takes its
    bursts over after the lease, A's late replies and the writes the cut held are refused after the heal, A's
    webhooks during the cut never get a 200, and A rejoins and works."""
    customers = 4
    release = _hold_first_calls(fake_agent, customers, "STALE REPLY FROM A")
    a = hosts("host-a")
    acknowledged = set()
    for customer in range(customers):
        for part in range(2):
            text = f"p{customer}-{part}"
            assert post(a.serve, message(f"503710000{customer:02d}", text)) == 200
            acknowledged.add(text)
    fake_agent.wait_for(lambda arrivals: len(arrivals) >= customers, arrived=True)
    assert _held_by(fault_sql, a) == customers
    b = hosts("host-b")

    a.database.blackhole()
    cut_at = time.monotonic()
    release.set()  # A's agent answers now: A wants to mark and send, but cannot reach PostgreSQL
    during = _post_during_cut(a, 1)
    assert 200 not in during, f"a cut-off host acknowledged a webhook: {during}"
    assert post(b.serve, message("50372000001", "b-during")) == 200
    acknowledged.add("b-during")
    fake_wati.wait_for_sent(customers + 1, timeout=60)
    taken_over = _answered_at(fake_wati, "p") - cut_at
    assert b.log().count("took over from host-a:") == customers
    wait_until(lambda: a.log().count("database error mid-burst") + a.log().count("lease lost") >= customers,
               timeout=30, what="A to give its bursts up")

    rejoined, counts = _heal_and_rejoin(a, [a.database], fault_sql, fake_wati, acknowledged, "a-after")
    assert not [s for s in fake_wati.sent if "STALE" in (s["text"] or "")], "A's late replies were never sent"
    assert fault_sql("SELECT count(*) FROM watibot.burst WHERE reply LIKE '%STALE%'") == [(0,)], \
        "A's held writes, delivered after the heal, changed nothing"
    assert a.database.held_bytes > 0, "the cut really held some of A's traffic"
    print(f"\npartition of one host from PostgreSQL: {customers} bursts answered by B {taken_over:.1f} s after the "
          f"cut (lease {LEASE:g} s); A's webhooks during the cut: {during}, of which {_stored_late(fault_sql, a)} "
          f"committed after the heal (answered once, as WATI's retry would be a duplicate); {a.database.held_bytes} "
          f"bytes held and delivered after the heal; A ready {rejoined:.1f} s after the heal; {counts}")


def test_a_host_cut_off_from_everything_is_taken_over_and_rejoins(
    hosts: Callable[..., Host], fault_sql: Sql, fake_wati: FakeWati, fake_agent: FakeAgent,
) -> None:
    """Host A loses PostgreSQL, the agent and WATI at once mid-burst: host B answers A's customers after the lease;
    after the heal A's late agent answers are never sent, and A takes new work."""
    customers = 3
    release = _hold_first_calls(fake_agent, customers, "STALE REPLY FROM A")
    a = hosts("host-a", total=True)
    acknowledged = set()
    for customer in range(customers):
        text = f"t{customer}"
        assert post(a.serve, message(f"503740000{customer:02d}", text)) == 200
        acknowledged.add(text)
    fake_agent.wait_for(lambda arrivals: len(arrivals) >= customers, arrived=True)
    b = hosts("host-b")

    for link in a.links:
        link.blackhole()
    cut_at = time.monotonic()
    release.set()  # the agent answers, but the answers are held on A's cut link
    during = _post_during_cut(a, 2)
    assert 200 not in during, f"a cut-off host acknowledged a webhook: {during}"
    fake_wati.wait_for_sent(customers, timeout=60)
    taken_over = _answered_at(fake_wati, "t") - cut_at
    assert b.log().count("took over from host-a:") == customers
    wait_until(lambda: a.log().count("lease lost") >= customers, timeout=30, what="A to notice its leases are gone")

    rejoined, counts = _heal_and_rejoin(a, a.links, fault_sql, fake_wati, acknowledged, "a-after-total")
    assert not [s for s in fake_wati.sent if "STALE" in (s["text"] or "")]
    print(f"\ntotal partition of one host: {customers} bursts answered by B {taken_over:.1f} s after the cut "
          f"(lease {LEASE:g} s); A's webhooks during the cut: {during}, of which {_stored_late(fault_sql, a)} "
          f"committed after the heal; A ready {rejoined:.1f} s after the heal; {counts}")
