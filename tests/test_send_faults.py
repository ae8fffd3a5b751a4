"""Issue 12's fault figures: a real `watibot serve` tree against a fake WATI that, for a fixed share of
conversations, records the reply and then answers a gateway's 502 or 504, drops the connection, or answers only
after the send has timed out. The same faults are injected with reconciliation on (the default) and off
(WATIBOT_WATI_RECONCILE_SECONDS=0, the behaviour before: an unknown send pages a human); both keep the invariant
and send no reply twice, and reconciliation leaves strictly fewer bursts in `attention`.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import ServeProcess, post, serve_environment, sql_on, template_copy
from tests.fakes import Answer, FakeAgent, FakeWati, echo_reply
from tests.invariants import ECHO_LINE, check_invariant, message, wait_drained

pytestmark = pytest.mark.processes

CUSTOMERS = 24  # conversations per run; every other one meets a fault on its first send
WATI_TIMEOUT = 2.0
GATEWAY_PAGE = b"<html><body><h1>%d Bad Gateway</h1></body></html>"
KINDS = ("gateway-502", "gateway-504", "dropped", "timeout")


def fault(kind: str) -> Answer:
    """WATI records the message, and then the client sees `kind` instead of WATI's answer."""
    if kind == "gateway-502":
        return Answer(502, raw=GATEWAY_PAGE % 502, record=True)
    if kind == "gateway-504":
        return Answer(504, raw=GATEWAY_PAGE % 504, record=True)
    if kind == "dropped":
        return Answer(drop=True, record=True)
    return Answer(delay=WATI_TIMEOUT + 0.5, record=True)  # the client has given up before WATI answers


def customer(index: int) -> str:
    return f"5037700{index:04d}"


def injected() -> dict[str, str]:
    """Which conversations meet which fault on their first send (the same in both runs)."""
    return {customer(i): KINDS[(i // 2) % len(KINDS)] for i in range(0, CUSTOMERS, 2)}


class FaultyWati(FakeWati):
    """The fake WATI answering the first send to each faulted customer with its fault, the rest as WATI does."""

    def __init__(self, faults: dict[str, str]) -> None:
        super().__init__()
        self.pending = dict(faults)
        self._lock = threading.Lock()
        self.default = self.faulty

    def faulty(self, request: dict[str, Any]) -> Answer:
        wa_id = request["path"].rsplit("/", 1)[-1]
        with self._lock:
            kind = self.pending.pop(wa_id, None)
        return fault(kind) if kind else self.answer(request)


@dataclass
class Figures:
    attention: int
    duplicates: int
    sends: int
    history_lookups: int
    counts: dict[str, int]


def run_faults(processes: Callable[..., ServeProcess], database_url: str, reconcile: str) -> Figures:
    """One serve tree (two workers), CUSTOMERS conversations of two messages each, the injected faults; wait until
    every burst is closed and every send WATI took has been answered (or timed out), then check the invariant."""
    sql = sql_on(database_url)
    with FaultyWati(injected()) as wati, FakeAgent() as agent:
        agent.default = lambda request: Answer(body=echo_reply)
        env = serve_environment(database_url, wati, WATIBOT_AGENT="http", WATIBOT_AGENT_URL=agent.url,
                                WATIBOT_LEASE_SECONDS="10", WATIBOT_WATI_TIMEOUT_SECONDS=str(WATI_TIMEOUT),
                                WATIBOT_WATI_RECONCILE_SECONDS=reconcile, WATIBOT_BUFFER_SECONDS="0.5")
        serve = processes(env, workers=2)
        serve.wait_ready()
        acknowledged = set()
        for index in range(CUSTOMERS):
            for part in range(2):
                payload = message(customer(index), f"r{reconcile}-c{index}-p{part}")
                assert post(serve, payload) == 200
                acknowledged.add(payload["text"])
        wait_drained(sql, timeout=180)
        # the late answers (the timeout fault) are recorded once the fake has finished them
        wati.wait_for(lambda requests: len(requests) >= len(wati.arrivals), timeout=30)
        assert not wati.pending, f"faults not injected: {wati.pending}"
        counts = check_invariant(sql, wati, acknowledged)
        per_text = Counter(text for sent in wati.sent for text in ECHO_LINE.findall(sent["text"] or ""))
        (attention,) = sql("SELECT count(*) FROM watibot.burst WHERE status = 'attention'")[0]
        return Figures(int(attention), sum(count - 1 for count in per_text.values() if count > 1),
                       len(wati.requests), len(wati.history_requests), counts)


def test_reconciliation_pages_fewer_bursts_than_before_and_never_replies_twice(
    processes: Callable[..., ServeProcess], postgres_admin_url: str, template_database: str
) -> None:
    """With 502/504s, dropped connections and timeouts after WATI recorded the reply, reconciliation on and off
    both keep the invariant with zero duplicate replies, and on leaves strictly fewer bursts in attention."""
    with template_copy(postgres_admin_url, template_database, "sendfaults") as url:
        on = run_faults(processes, url, reconcile="2")
    with template_copy(postgres_admin_url, template_database, "sendfaults") as url:
        off = run_faults(processes, url, reconcile="0")
    faulted = len(injected())
    print(f"\nsend faults after WATI recorded the reply, {faulted} of {CUSTOMERS} conversations "
          f"({', '.join(KINDS)}): reconciliation on: {on}; off: {off}")
    assert on.duplicates == 0 and off.duplicates == 0
    assert off.attention == faulted, "without reconciliation every unknown send pages a human"
    assert on.attention < off.attention
    assert on.history_lookups > 0 and off.history_lookups == 0
