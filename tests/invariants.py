"""The promise watibot makes, checked after every fault scenario, and the load that puts it to the test.

The invariant: every message that got a 200 is stored and appears in exactly one sent reply, or in a burst that
is visibly dead or awaiting attention (at most one reply then); no customer gets two replies for the same
messages. Replies are made by the echo agent, which lists each message's text, so a reply can be traced back to
the messages it answers; every text is unique.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.conftest import PASSKEY, wait_until
from tests.fakes import FakeWati

Sql = Callable[..., list[tuple[Any, ...]]]
ECHO_LINE = re.compile(r"^\d+\. (.*)$", re.MULTILINE)


def message(wa_id: str, text: str, timestamp: int | None = None) -> dict[str, Any]:
    """A customer text message whose text doubles as its unique id."""
    return {
        "eventType": "message", "owner": False, "type": "text", "waId": wa_id, "channelPhoneNumber": "50322220000",
        "whatsappMessageId": f"wamid.{text}", "id": text, "text": text,
        "timestamp": str(timestamp or int(time.time())),
    }


@dataclass
class LoadResult:
    """What the load generator saw: which messages were acknowledged, and every other outcome."""

    acknowledged: set[str] = field(default_factory=set)
    refused: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    first_failure: float | None = None
    last_failure: float | None = None


class Load:
    """Posts messages from many customers in a background thread until stopped or `total` is reached."""

    def __init__(self, url: str, customers: int, rate: float, total: int, prefix: str = "m") -> None:
        self.url = url
        self.customers = customers
        self.rate = rate
        self.total = total
        self.prefix = prefix
        self.result = LoadResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self._stop.set()
        self._thread.join(timeout=60)
        return self.result

    def wait_done(self, timeout: float = 120) -> LoadResult:
        self._thread.join(timeout=timeout)
        assert not self._thread.is_alive(), "load did not finish"
        return self.result

    async def _post(self, session: aiohttp.ClientSession, number: int) -> None:
        wa_id = f"5037{number % self.customers:07d}"
        text = f"{self.prefix}{number}"
        self.result.sent += 1
        try:
            async with session.post(f"{self.url}/webhook", params={"passkey": PASSKEY},
                                    json=message(wa_id, text)) as response:
                await response.read()
                if response.status == 200:
                    self.result.acknowledged.add(text)
                    return
                outcome = f"HTTP {response.status}"
        except (TimeoutError, aiohttp.ClientError) as error:
            outcome = type(error).__name__
        self.result.refused[outcome] += 1
        now = time.monotonic()
        self.result.first_failure = self.result.first_failure or now
        self.result.last_failure = now

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as session:
            tasks: set[asyncio.Task[None]] = set()
            started = time.monotonic()
            for number in range(self.total):
                if self._stop.is_set():
                    break
                delay = started + number / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing the load, not synchronisation
                task = asyncio.create_task(self._post(session, number))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)


@dataclass
class KillReport:
    """What `kill_the_busiest_worker` saw."""

    held: int  # bursts the killed worker held
    recovery_seconds: float  # from the kill until every burst was answered
    counts: dict[str, int]


def kill_the_busiest_worker(serve: Any, sql: Sql, wati: FakeWati, agent: Any, prefix: str,
                            customers: int = 6) -> KillReport:
    """kill -9 the worker holding the most bursts while the agent works on them; wait until another worker has
    answered each once (after the lease) and check the invariant. The agent's first `customers` calls hang."""
    from tests.conftest import holders, post
    from tests.fakes import Answer, echo_reply

    release = threading.Event()
    agent.default = lambda request: Answer(body=echo_reply)
    agent.script = [Answer(body=echo_reply, hang_until=release) for _ in range(customers)]
    acknowledged = set()
    for customer in range(customers):
        for part in range(2):
            payload = message(f"503700000{customer:02d}", f"{prefix}{customer}-{part}")
            assert post(serve, payload) == 200
            acknowledged.add(payload["text"])
    agent.wait_for(lambda arrivals: len(arrivals) >= customers, arrived=True)
    held = holders(sql)
    victim = max(held, key=lambda pid: len(held[pid]))
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    release.set()
    wati.wait_for_sent(customers, timeout=60)
    recovery = time.monotonic() - killed_at
    wait_drained(sql)
    counts = check_invariant(sql, wati, acknowledged)
    # Every burst the victim held was taken over; on a stalled machine a survivor may lose a lease too (and its
    # burst be taken over once more), which the invariant above already shows did no harm.
    taken_over = sql("SELECT count(*) FROM watibot.burst WHERE attempts >= 2 AND status = 'sent'")[0][0]
    assert taken_over >= len(held[victim])
    return KillReport(len(held[victim]), recovery, counts)


def wait_drained(sql: Sql, timeout: float = 120) -> None:
    """Wait until nothing is buffered, claimed or open: every stored message has reached a closed burst."""
    wait_until(
        lambda: sql(
            "SELECT (SELECT count(*) FROM watibot.message_outcome WHERE burst_id IS NULL) "
            "+ (SELECT count(*) FROM watibot.conversation WHERE due_at IS NOT NULL OR claimed_by IS NOT NULL) "
            "+ (SELECT count(*) FROM watibot.burst WHERE status IN ('processing', 'sending', 'retry'))"
        ) == [(0,)],
        timeout=timeout, interval=0.2, what="the buffer to drain",
    )


def check_invariant(sql: Sql, wati: FakeWati, acknowledged: set[str]) -> dict[str, int]:
    """Assert the invariant; returns counts for the report."""
    stored = {text: (burst_id, status) for text, burst_id, status in sql(
        "SELECT text, burst_id, status FROM watibot.message_outcome")}
    lost = acknowledged - stored.keys()
    assert not lost, f"{len(lost)} acknowledged messages were lost: {sorted(lost)[:10]}"

    accepted = wati.sent
    local_ids = Counter(send["local_message_id"] for send in accepted)
    repeated = {local_id: count for local_id, count in local_ids.items() if count > 1}
    assert not repeated, f"bursts sent more than once: {repeated}"
    replies_per_text: Counter[str] = Counter()
    for send in accepted:
        for text in ECHO_LINE.findall(send["text"] or ""):
            replies_per_text[text] += 1

    for text, (burst_id, status) in stored.items():
        answered = replies_per_text[text]
        assert burst_id is not None, f"message {text} still buffered"
        if status == "sent":
            assert answered == 1, f"message {text} of a sent burst appears in {answered} replies"
        elif status == "attention":
            assert answered <= 1, f"message {text} (attention) appears in {answered} replies"
        else:
            assert answered == 0, f"message {text} of a {status} burst appears in {answered} replies"
    statuses = Counter(status for _, status in stored.values())
    return {
        "acknowledged": len(acknowledged),
        "stored": len(stored),
        "acknowledged_but_lost": 0,
        "replies": len(accepted),
        "duplicate_replies": 0,
        **{f"messages_{status}": count for status, count in sorted(statuses.items())},
    }
