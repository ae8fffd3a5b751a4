"""Table health: `watibot prune` running during continuous load keeps the tables bounded and loses nothing."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.conftest import RunningApp, app_settings, customer_message, wait_until
from tests.fakes import FakeWati
from tests.test_cli import watibot
from tests.test_metrics import scrape, value

Sql = Callable[..., list[tuple[Any, ...]]]

LOAD_SECONDS = 8.0
CUSTOMERS = 25


def test_pruning_during_continuous_load_keeps_tables_bounded_and_counts_everything(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """While webhooks keep coming, repeated prunes keep the message table small, never delay a webhook for
    long, delete only answered messages, and /metrics still counts every burst."""
    app = run_app(app_settings(database_url, fake_wati, buffer_seconds=0.2, poll_seconds=0.2))
    stop = threading.Event()
    latencies: list[float] = []
    statuses: list[int] = []

    def load() -> None:
        index = 0
        while not stop.is_set():
            started = time.perf_counter()
            response = app.post(customer_message(f"5037{index % CUSTOMERS:07d}", f"message {index}"))
            latencies.append(time.perf_counter() - started)
            statuses.append(response.status_code)
            index += 1
            time.sleep(0.01)  # pacing the customers, not synchronisation

    loader = threading.Thread(target=load)
    loader.start()
    deadline = time.monotonic() + LOAD_SECONDS
    pruned_messages, prune_seconds, message_rows = 0, [], []
    try:
        while time.monotonic() < deadline:
            started = time.monotonic()
            result = watibot("prune", "--older-than", "1s", "--batch-size", "20",
                             env={"WATIBOT_DATABASE_URL": database_url})
            prune_seconds.append(time.monotonic() - started)
            assert result.returncode == 0, result.stderr
            pruned_messages += int(re.search(r"and (\d+) messages", result.stdout).group(1))  # type: ignore[union-attr]
            message_rows.append(sql("SELECT count(*) FROM watibot.message")[0][0])
    finally:
        stop.set()
        loader.join(timeout=30)

    posted = len(statuses)
    assert statuses == [200] * posted  # a webhook held up past WATIBOT_DB_TIMEOUT_SECONDS would have been a 503
    assert len(message_rows) >= 3, "several prunes ran during the load"
    assert pruned_messages > posted / 3, "pruning kept up with the load"
    assert max(message_rows[1:]) < posted * 0.6, f"message table stayed bounded: {message_rows} of {posted}"

    wait_until(lambda: sql("SELECT count(*) FROM watibot.message_outcome WHERE burst_id IS NULL") == [(0,)]
               and sql("SELECT count(*) FROM watibot.burst WHERE finished_at IS NULL") == [(0,)],
               timeout=30, what="every message answered")
    wait_until(lambda: sql("SELECT now() - max(finished_at) > interval '1.2 s' FROM watibot.burst") == [(True,)],
               timeout=10, what="the last burst to age past the cutoff")
    final = watibot("prune", "--older-than", "1s", env={"WATIBOT_DATABASE_URL": database_url})
    pruned_messages += int(re.search(r"and (\d+) messages", final.stdout).group(1))  # type: ignore[union-attr]
    assert pruned_messages == posted, "every message was answered before it was deleted, none twice"
    assert sql("SELECT count(*) FROM watibot.message") == [(0,)]
    assert sql("SELECT count(*) FROM watibot.burst") == [(0,)]
    samples = scrape(app.url)
    assert value(samples, "watibot_bursts_total", outcome="sent") == len(fake_wati.sent)
    assert value(samples, "watibot_claim_lag_count") == len(fake_wati.sent)
    print(f"\nprune under load: {posted} webhooks in {LOAD_SECONDS:.0f} s, {len(prune_seconds)} prunes "
          f"(max {max(prune_seconds):.2f} s), message rows sampled {message_rows}, "
          f"webhook max {max(latencies) * 1000:.0f} ms, {len(fake_wati.sent)} replies")
