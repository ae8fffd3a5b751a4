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


FULL_RECOUNT = """
SELECT series, label, sum(count)::bigint, sum(sum)::numeric(20, 6)
FROM (SELECT * FROM watibot.burst_fact_totals() UNION ALL SELECT * FROM watibot.pruned_burst_totals) AS t
GROUP BY series, label HAVING sum(count) <> 0 ORDER BY series, label
"""


def scrape_totals(sql: Sql) -> list[tuple[Any, ...]]:
    """The burst totals as /metrics reads them (rollup + pruned + bursts since the mark), in FULL_RECOUNT's shape."""
    from watibot.store.operators import BURST_TOTALS

    query = f"SELECT series, label, count, sum::numeric(20, 6) FROM ({BURST_TOTALS}) AS t ORDER BY series, label"  # noqa: S608
    return sql(query)


def add_finished_bursts(sql: Sql, customer: str, count: int, status: str, age: str) -> None:
    """`count` bursts of `customer` finished `age` ago with varied claim lags and agent times."""
    sql("INSERT INTO watibot.conversation (channel, customer, wa_id) VALUES ('50322220000', %s, %s) "
        "ON CONFLICT DO NOTHING", customer, customer)
    sql("""INSERT INTO watibot.burst (channel, customer, status, fence, claimed_by, due_at, started_at,
                                      agent_started_at, agent_finished_at, finished_at, parts_sent, sent_at)
           SELECT '50322220000', %s, %s, 1, 'test:1:x', now() - %s::interval - g * interval '0.7 s',
                  now() - %s::interval, now() - %s::interval, now() - %s::interval + g * interval '0.3 s',
                  now() - %s::interval + g * interval '0.5 s', 0, NULL
           FROM generate_series(1, %s) AS g""", customer, status, age, age, age, age, age, count)


def test_burst_totals_rollup_keeps_the_numbers_of_a_full_recount(sql: Sql) -> None:
    """The rolled-up totals /metrics reads equal a recount over every burst, through roll-ups, replays, delivery
    reports, late inserts and prunes of bursts behind the mark."""
    add_finished_bursts(sql, "50311111111", 40, "sent", "3 hours")
    add_finished_bursts(sql, "50322222222", 7, "dead", "2 hours")
    add_finished_bursts(sql, "50333333333", 5, "no_reply", "1 minute")
    assert sql("SELECT count(*) FROM watibot.burst_totals_rollup") == [(0,)]
    assert scrape_totals(sql) == sql(FULL_RECOUNT)
    # the same series over rows and over a range of finish times as over ids
    every = sql("SELECT * FROM watibot.burst_fact_totals() ORDER BY 1, 2")
    assert sql("SELECT * FROM watibot.burst_row_totals(ARRAY(SELECT b FROM watibot.burst AS b)) ORDER BY 1, 2") == every
    assert sql("SELECT * FROM watibot.burst_range_totals('-infinity', 'infinity') ORDER BY 1, 2") == every

    # rolled up in steps of 10 bursts; the margin keeps the burst finished a minute ago out
    while True:
        mark = sql("SELECT rolled_through::text FROM watibot.burst_totals_mark")[0][0]
        assert sql("SELECT watibot.roll_up_burst_totals(interval '10 minutes', 10)::text")[0][0] is not None
        if sql("SELECT rolled_through::text FROM watibot.burst_totals_mark")[0][0] == mark:
            break
    assert sql("SELECT count(*) FROM watibot.burst WHERE finished_at >= "
               "(SELECT rolled_through FROM watibot.burst_totals_mark)") == [(5,)]
    assert sql("SELECT count FROM watibot.burst_totals_rollup WHERE series = 'outcome' AND label = 'sent'") == [(40,)]
    assert scrape_totals(sql) == sql(FULL_RECOUNT)

    # a replay and a delivery report change bursts behind the mark
    dead = sql("SELECT id FROM watibot.burst WHERE status = 'dead' ORDER BY id LIMIT 1")[0][0]
    assert sql("SELECT outcome FROM watibot.replay_burst(%s, false)", dead) == [("replayed",)]
    sql("UPDATE watibot.burst SET status = 'attention' WHERE id = (SELECT min(id) FROM watibot.burst "
        "WHERE status = 'sent')")
    # bursts inserted already finished long ago (an import)
    add_finished_bursts(sql, "50344444444", 3, "sent", "5 hours")
    assert scrape_totals(sql) == sql(FULL_RECOUNT)
    assert ("replayed", "true", 1) in [row[:3] for row in scrape_totals(sql)]

    # prune folds what it deletes into pruned_burst_totals; the rollup forgets it: the totals do not move
    from watibot.store.operators import PRUNE_BATCH
    from watibot.store.records import CONSUMING_STATUSES, OPEN_STATUSES

    before = scrape_totals(sql)
    deleted = sql(PRUNE_BATCH.replace("$1", "now() - interval '150 minutes'").replace("$2", "%s")
                  .replace("$3", "%s").replace("$4", "%s"), list(OPEN_STATUSES), 25, sorted(CONSUMING_STATUSES))
    assert deleted[0][0] == 25
    assert scrape_totals(sql) == before == sql(FULL_RECOUNT)


def test_metrics_token_is_required_when_set_and_compared_exactly(
    run_app: Callable[..., RunningApp], database_url: str
) -> None:
    """With WATIBOT_METRICS_TOKEN set, /metrics answers 401 without the bearer token or with a wrong one."""
    token = "metrics-token-0123456789abcdef"
    app = run_app(app_settings(database_url, metrics_token=token))
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789abcd"}, {"Authorization": token},
                    {"Authorization": f"Basic {token}"}, {"Authorization": f"Bearer {token}x"}):
        response = httpx.get(f"{app.url}/metrics", headers=headers, timeout=10)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "watibot_" not in response.text
    response = httpx.get(f"{app.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert response.status_code == 200
    assert "watibot_database_up 1.0" in response.text


def test_concurrent_scrapes_share_one_database_reading(run_app: Callable[..., RunningApp], database_url: str) -> None:
    """Thirty concurrent scrapes within the cache age make one database reading in the worker, not thirty."""
    app = run_app(app_settings(database_url, metrics_cache_seconds=120))

    async def scrape_all() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            responses = await asyncio.gather(*(client.get(f"{app.url}/metrics") for _ in range(30)))
        return [response.status_code for response in responses]

    assert asyncio.run(scrape_all()) == [200] * 30
    assert app.server.config.app.state.metrics_cache.readings == 1  # type: ignore[union-attr]


def test_a_flood_of_scrapes_is_paced_and_answered_429_past_the_wait(
    run_app: Callable[..., RunningApp], database_url: str
) -> None:
    """300 scrapes at once on one worker: 20 a second are answered 200 (after one database reading), those whose
    turn is more than 5 s away get 429 with Retry-After at once; a webhook meanwhile is answered as usual."""
    import time

    app = run_app(app_settings(database_url, metrics_cache_seconds=120, sweeper=False))

    async def flood() -> tuple[list[httpx.Response], int]:
        limits = httpx.Limits(max_connections=400)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            scrapes = [asyncio.ensure_future(client.get(f"{app.url}/metrics")) for _ in range(300)]
            webhook = await client.post(f"{app.url}/webhook", params={"passkey": PASSKEY},
                                        json=customer_message("50376819621", "during the flood"))
            return list(await asyncio.gather(*scrapes)), webhook.status_code

    started = time.monotonic()
    responses, webhook_status = asyncio.run(flood())
    elapsed = time.monotonic() - started
    statuses = [response.status_code for response in responses]
    assert set(statuses) == {200, 429}
    # 20 at once, then 20 a second up to 5 s ahead of each arrival (arrivals spread over at most `elapsed`)
    assert 120 <= statuses.count(200) <= 21 + 20 * (5 + elapsed), (statuses.count(200), elapsed)
    refused = next(response for response in responses if response.status_code == 429)
    assert refused.headers["retry-after"] == "5"
    assert webhook_status == 200
    assert app.server.config.app.state.metrics_cache.readings == 1  # type: ignore[union-attr]
