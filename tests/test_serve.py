"""`watibot serve` as a real process tree: several workers, each with its sweeper, on one database."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import PASSKEY, ServeProcess, serve_environment, wait_until
from tests.fakes import FakeWati

Sql = Callable[..., list[tuple[Any, ...]]]

pytestmark = pytest.mark.processes


async def post_all(url: str, payloads: list[dict[str, Any]], concurrency: int) -> list[tuple[int, float]]:
    """POST every payload to the webhook with `concurrency` in flight; returns (status, seconds) for each."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    results: list[tuple[int, float]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def sender() -> None:
            while not queue.empty():
                payload = queue.get_nowait()
                started = time.perf_counter()
                async with session.post(f"{url}/webhook", params={"passkey": PASSKEY}, json=payload) as response:
                    await response.read()
                    results.append((response.status, time.perf_counter() - started))

        await asyncio.gather(*(sender() for _ in range(concurrency)))
    return results


def test_four_workers_answer_200_customers_once_each_with_all_their_messages_in_order(
    serve: Callable[..., ServeProcess], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """200 customers × 5 messages posted concurrently to 4 workers → exactly 200 replies, each complete and in order."""
    process = serve(serve_environment(database_url, fake_wati, WATIBOT_BUFFER_SECONDS="3"), workers=4)
    base = int(time.time())
    payloads = []
    for customer in range(200):
        wa_id = f"5037{customer:07d}"
        mine = [
            {
                "eventType": "message", "owner": False, "type": "text", "waId": wa_id,
                "channelPhoneNumber": "50322220000", "whatsappMessageId": f"wamid.{wa_id}.{index}",
                "id": f"{wa_id}{index}", "text": f"c{customer}-m{index}", "timestamp": str(base + index),
            }
            for index in range(5)
        ]
        random.shuffle(mine)  # arrival order differs from typing order; the burst follows the timestamps
        payloads += mine
    started = time.monotonic()
    results = asyncio.run(post_all(process.url, payloads, concurrency=64))
    posted = time.monotonic() - started
    assert [status for status, _ in results] == [200] * 1000
    sent = fake_wati.wait_for_sent(200, timeout=120)
    elapsed = time.monotonic() - started
    wait_until(lambda: sql("SELECT count(*) FROM watibot.burst WHERE status = 'sent'") == [(200,)], timeout=30)
    assert len(fake_wati.sent) == 200, "no customer is answered twice"
    by_customer = {message["wa_id"]: message["text"] for message in fake_wati.sent}
    assert len(by_customer) == 200
    for customer in range(200):
        expected = "\n".join(f"{n + 1}. c{customer}-m{n}" for n in range(5))
        assert by_customer[f"5037{customer:07d}"] == f"Received 5 messages:\n{expected}"
    owners = sql("SELECT count(DISTINCT split_part(claimed_by, ':', 2)) FROM watibot.burst")[0][0]
    latencies = sorted(seconds for _, seconds in results)
    print(f"\n200x5: posted in {posted:.2f} s, all 200 replies after {elapsed:.2f} s (3 s window); "
          f"webhook p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms; bursts processed by {owners} workers")
    assert owners >= 2, "the sweepers of several workers share the work"
    assert len(sent) >= 200


def test_serve_applies_migrations_and_reports_ready(
    serve: Callable[..., ServeProcess], postgres_admin_url: str, fake_wati: FakeWati
) -> None:
    """On an empty database serve migrates first; /readyz then reports ready and /healthz ok."""
    import uuid

    import httpx

    from tests.conftest import admin_execute, with_database

    name = f"empty_{uuid.uuid4().hex[:8]}"
    admin_execute(postgres_admin_url, f"CREATE DATABASE {name}")
    try:
        process = serve(serve_environment(with_database(postgres_admin_url, name), fake_wati), workers=1)
        assert httpx.get(f"{process.url}/readyz").json() == {"status": "ready"}
        assert httpx.get(f"{process.url}/healthz").json() == {"status": "ok"}
        process.stop()
    finally:
        admin_execute(postgres_admin_url, f"DROP DATABASE {name} WITH (FORCE)")


def test_without_database_url_serve_runs_an_embedded_postgres_that_is_reused_and_stopped(
    tmp_path: Any, fake_wati: FakeWati
) -> None:
    """No WATIBOT_DATABASE_URL: serve starts PostgreSQL under DATA_DIR, stops it on exit, and reuses its data."""
    import httpx

    from tests.conftest import ServeProcess
    from watibot.embedded import EmbeddedCluster

    env = serve_environment("", fake_wati, WATIBOT_DATA_DIR=str(tmp_path / "data"), WATIBOT_BUFFER_SECONDS="60")
    del env["WATIBOT_DATABASE_URL"]
    cluster = EmbeddedCluster(tmp_path / "data")
    first = ServeProcess(env, 1, tmp_path / "first.log")
    try:
        first.wait_ready(timeout=120)
        response = httpx.post(f"{first.url}/webhook", params={"passkey": PASSKEY}, json={
            "eventType": "message", "waId": "50376819621", "whatsappMessageId": "wamid.kept", "text": "keep me"})
        assert response.json() == {"status": "buffered"}
    finally:
        assert first.stop() == 0
    assert not cluster.running(), "the embedded server is stopped with the service"
    second = ServeProcess(env, 1, tmp_path / "second.log")
    try:
        second.wait_ready(timeout=120)
        response = httpx.post(f"{second.url}/webhook", params={"passkey": PASSKEY}, json={
            "eventType": "message", "waId": "50376819621", "whatsappMessageId": "wamid.kept", "text": "keep me"})
        assert response.json() == {"status": "duplicate"}, "the data directory was reused"
    finally:
        second.stop()
    assert not cluster.running()


def test_serve_warns_when_its_connections_cannot_fit_the_server(
    serve: Callable[..., ServeProcess], database_url: str, sql: Sql, fake_wati: FakeWati
) -> None:
    """workers x WATIBOT_DB_POOL_SIZE above what PostgreSQL has free: serve starts, and says so with the figures."""
    max_connections = int(sql("SHOW max_connections")[0][0])
    pool = max_connections // 2 + 1  # two workers of this pool size need more than the server has
    fits = serve(serve_environment(database_url, fake_wati, WATIBOT_DB_POOL_SIZE="3"), workers=2)
    assert "connection budget" not in fits.log_path.read_text()
    fits.stop()
    tight = serve(serve_environment(database_url, fake_wati, WATIBOT_DB_POOL_SIZE=str(pool)), workers=2)
    log = tight.log_path.read_text()
    assert f"this serve may open {2 * pool} connections (2 workers x WATIBOT_DB_POOL_SIZE {pool})" in log
    assert f"max_connections {max_connections}" in log
