"""`GET /metrics`: Prometheus text, with the same totals whichever worker of a multi-worker serve answers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    PASSKEY,
    RunningApp,
    ServeProcess,
    add_message,
    app_settings,
    customer_message,
    serve_environment,
    wait_until,
)
from tests.fakes import Answer, FakeWati
from tests.test_serve import post_all

Sql = Callable[..., list[tuple[Any, ...]]]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape on a new connection: {(sample name, sorted labels): value}."""
    response = httpx.get(f"{url}/metrics", timeout=10, headers={"Connection": "close"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def scrape_when(url: str, predicate: Callable[[Any], bool], what: str) -> Any:
    """Scrape until `predicate(samples)` holds (30 s deadline); returns those samples."""

    def attempt() -> Any:
        samples = scrape(url)
        return samples if predicate(samples) else None

    return wait_until(attempt, timeout=30, what=what)


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.processes
def test_three_workers_report_the_same_totals_matching_the_webhooks_sent(
    serve: Callable[..., ServeProcess], database_url: str, fake_wati: FakeWati, tmp_path: Path, sql: Sql
) -> None:
    """Scrapes of a 3-worker serve all report the webhooks and bursts that were sent, whichever worker answers."""
    metrics_directory = tmp_path / "metrics"
    # small claim batches so that every worker's sweeper sends some of the replies
    environment = serve_environment(database_url, fake_wati, PROMETHEUS_MULTIPROC_DIR=str(metrics_directory),
                                    WATIBOT_CLAIM_BATCH="2")
    process = serve(environment, workers=3)
    customers, per_customer = 30, 3
    payloads = [customer_message(f"5037{customer:07d}", f"m{index}", f"wamid.{customer}.{index}")
                for customer in range(customers) for index in range(per_customer)]
    duplicates = payloads[:10]
    results = asyncio.run(post_all(process.url, payloads + duplicates, concurrency=16))
    assert [status for status, _ in results] == [200] * len(results)
    for _ in range(4):
        assert httpx.post(f"{process.url}/webhook", params={"passkey": "wrong-passkey-0123456789"},
                          json=payloads[0]).status_code == 401
    assert httpx.post(f"{process.url}/webhook", params={"passkey": PASSKEY},
                      json={"eventType": "sentMessageDELIVERED_v2", "localMessageId": "1"}).status_code == 200
    # Every message answered; a stalled machine may split a customer's three messages into two bursts, so the
    # expected totals are the bursts the database holds.
    wait_until(lambda: sql("SELECT count(*) FILTER (WHERE status = 'sent'), count(*) FROM watibot.message_outcome")
               == [(customers * per_customer, customers * per_customer)], timeout=60, what="every message answered")
    bursts = sql("SELECT count(*) FROM watibot.burst WHERE status = 'sent'")[0][0]
    assert len(fake_wati.sent) == bursts
    # the last burst commits just after WATI accepted it
    samples = scrape_when(process.url, lambda s: value(s, "watibot_bursts_total", outcome="sent") == bursts,
                          "every burst committed")
    scrapes = [samples] + [scrape(process.url) for _ in range(11)]
    for samples in scrapes:
        assert value(samples, "watibot_webhooks_total", status="buffered") == customers * per_customer
        assert value(samples, "watibot_webhooks_total", status="duplicate") == len(duplicates)
        assert value(samples, "watibot_webhooks_total", status="unauthorized") == 4
        assert value(samples, "watibot_webhooks_total", status="ignored") == 1
        assert value(samples, "watibot_bursts_total", outcome="sent") == bursts
        assert value(samples, "watibot_bursts_total", outcome="dead") == 0
        assert value(samples, "watibot_claim_lag_count") == bursts
        assert value(samples, "watibot_claim_lag_bucket", le="+Inf") == bursts
        assert value(samples, "watibot_agent_seconds_count") == bursts
        assert value(samples, "watibot_wati_send_seconds_count", outcome="accepted") == bursts
        assert value(samples, "watibot_buffered_messages") == 0
        assert value(samples, "watibot_conversations", state="overdue") == 0
        assert value(samples, "watibot_database_up") == 1
    assert all(samples == scrapes[0] for samples in scrapes), "every worker reports the same numbers"
    senders = sql("SELECT count(DISTINCT claimed_by) FROM watibot.burst")[0][0]
    assert senders >= 2, "the WATI send counts above were added up from several workers' files"
    writers = {path.stem.rsplit("_", 1)[-1] for path in metrics_directory.glob("*.db")}
    assert len(writers) >= 3, f"every worker keeps its own file: {writers}"


def test_metrics_count_dead_bursts_takeovers_and_report_the_database_state(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """An expired lease taken over, a dead burst and a buffering conversation all show in /metrics."""
    sql("INSERT INTO watibot.conversation (channel, customer, wa_id, due_at, claimed_by, claimed_at, "
        "lease_expires_at, fence) VALUES ('50322220000', '50399999999', '50399999999', now() + interval '5 s', "
        "'gone:1:x', now() - interval '25 s', now() + interval '5 s', 4), "
        "('50322220000', '50311111111', NULL, now() + interval '1 hour', NULL, NULL, NULL, 0)")
    add_message(sql, "50399999999", "still there?", channel="50322220000", provider_message_id="wamid.orphan")
    add_message(sql, "50311111111", "later", channel="50322220000", provider_message_id="wamid.later")
    app = run_app(app_settings(database_url, fake_wati))
    before = scrape(app.url)
    assert value(before, "watibot_conversations", state="in_flight") == 1
    assert value(before, "watibot_conversations", state="buffering") == 1

    samples = scrape_when(app.url, lambda s: value(s, "watibot_bursts_total", outcome="sent") == 1,
                          "the taken-over conversation answered")
    assert value(samples, "watibot_lease_takeovers_total") - value(before, "watibot_lease_takeovers_total") == 1
    assert value(samples, "watibot_buffered_messages") == 1
    assert value(samples, "watibot_conversations", state="in_flight") == 0

    fake_wati.script = [Answer(status=401)]
    app.post(customer_message("50376819621", "hello"))
    samples = scrape_when(app.url, lambda s: value(s, "watibot_bursts_total", outcome="dead") == 1, "a dead burst")
    assert value(samples, "watibot_bursts_unresolved", status="dead") == 1
    assert value(samples, "watibot_webhooks_total", status="buffered") - value(
        before, "watibot_webhooks_total", status="buffered") == 1
    assert value(samples, "watibot_wati_send_seconds_count", outcome="rejected") >= 1
    assert value(samples, "watibot_bursts_total", outcome="sent") == 1
