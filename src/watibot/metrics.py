"""`GET /metrics` in Prometheus text format, the same whichever worker process answers the scrape.

Two sources, chosen so that no number depends on which worker Prometheus happens to reach:

- **The database**, read at most every WATIBOT_METRICS_CACHE_SECONDS per process (`DatabaseReading`: one
  reading at a time, shared by concurrent scrapes): gauges (conversations by state, overdue lag, buffered
  messages, dead and attention bursts) and the burst counters and histograms (bursts by outcome, claim lag, agent
  time), computed from finished bursts (a rollup behind a mark plus the bursts finished since, migration 0010_hardening)
  plus `watibot.pruned_burst_totals`. They count the work of every worker on every host, and survive restarts.
  On several hosts, every host reports the same values: aggregate them with `max`.
- **Events seen only by a process** (webhooks by status, WATI send latency, lease takeovers): prometheus-client's
  multiprocess mode. `watibot serve` points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory before the workers
  start; each worker writes its counters there and a scrape sums every worker's files, those of workers that
  have exited included, so counters never jump back. These are per host (one `serve`).

prometheus_client picks its storage when first imported, so nothing imports this module before `serve` has set
the variable (the CLI imports it lazily).
"""

from __future__ import annotations

import asyncio
import fcntl
import hmac
import os
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Receive, Scope, Send

from watibot.clients import SendRejected, SendUnknown, WatiClient
from watibot.db import DatabaseError
from watibot.store.records import BurstStatus, Claim

MULTIPROCESS_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"
WEBHOOK_STATUSES = ("buffered", "duplicate", "paused", "recorded", "ignored", "unauthorized", "too_large",
                    "unsupported_media_type", "invalid", "unavailable", "body_timeout", "disconnected")
_STATUS_BY_CODE = {401: "unauthorized", 408: "body_timeout", 413: "too_large", 415: "unsupported_media_type",
                   422: "invalid", 500: "error", 503: "unavailable"}
# How a burst can end (a replayed one counts under the outcome it had first).
BURST_OUTCOMES = tuple(status.value for status in BurstStatus if not status.open and status != BurstStatus.REPLAYED)
# The upper bounds of watibot.histogram_bucket (migration 0003), in order.
DATABASE_BUCKETS = ("0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "60", "120", "300", "600", "+Inf")

_process_registry = CollectorRegistry()
WEBHOOKS = Counter("watibot_webhooks", "Webhook requests answered, by status: buffered, duplicate, ignored, or "
                   "the refusal (unauthorized, too_large, unsupported_media_type, invalid, unavailable, "
                   "body_timeout, error) or disconnected (the client went away mid-body).",
                   ["status"], registry=_process_registry)
WATI_SEND_SECONDS = Histogram("watibot_wati_send_seconds", "Time of one WATI sendSessionMessage call, by outcome "
                              "(accepted, rejected, unknown).", ["outcome"], registry=_process_registry,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
LEASE_TAKEOVERS = Counter("watibot_lease_takeovers", "Conversations claimed after another worker's lease expired "
                          "(that worker died, hung, or lost the database).", registry=_process_registry)
# Every label value exists from the start (at 0), so rates and alerts work before the first event.
for _status in WEBHOOK_STATUSES:
    WEBHOOKS.labels(status=_status)
for _outcome in ("accepted", "rejected", "unknown"):
    WATI_SEND_SECONDS.labels(outcome=_outcome)

# A worker answers at most this many scrapes a second (Prometheus scrapes every 15-60 s); more wait their turn,
# and one more than MAX_SCRAPE_WAIT_SECONDS away is answered 429.
SCRAPES_PER_SECOND = 20.0
MAX_SCRAPE_WAIT_SECONDS = 5.0

router = APIRouter()


def count_webhook(code: int, status: str | None = None) -> str:
    """Count one answered webhook: by `status` for a 200 (or a client gone mid-body: "disconnected"), by what the
    HTTP `code` means otherwise."""
    label = status if status and (code == 200 or status == "disconnected") else _STATUS_BY_CODE.get(code, str(code))
    WEBHOOKS.labels(status=label).inc()
    return label


def observe_claim(claim: Claim) -> None:
    """Count a claim that took a conversation over from a worker whose lease expired."""
    if claim.previous_owner is not None:
        LEASE_TAKEOVERS.inc()


class TimedWatiClient(WatiClient):
    """The WATI client, timing every send into `watibot_wati_send_seconds`."""

    async def send_text(self, wa_id: str, text: str, local_message_id: str, channel: str = "") -> tuple[str, ...]:
        """Send as `WatiClient.send_text` does, observing how long it took and how it ended."""
        started = time.perf_counter()
        outcome = "accepted"
        try:
            return await super().send_text(wa_id, text, local_message_id, channel)
        except SendRejected:
            outcome = "rejected"
            raise
        except SendUnknown:
            outcome = "unknown"
            raise
        finally:
            WATI_SEND_SECONDS.labels(outcome=outcome).observe(time.perf_counter() - started)


def _histogram(name: str, documentation: str, totals: dict[tuple[str, str], dict[str, Any]]) -> Metric:
    cumulative, buckets, total_sum = 0, [], 0.0
    for bound in DATABASE_BUCKETS:
        row = totals.get((name, bound))
        if row is not None:
            cumulative += int(row["count"])
            total_sum += float(row["sum"])
        buckets.append((bound, cumulative))
    return HistogramMetricFamily(f"watibot_{name}", documentation, buckets=buckets, sum_value=total_sum)


def database_metrics(health: dict[str, Any] | None, totals: list[dict[str, Any]]) -> list[Metric]:
    """The metric families computed from the database (`health` None: the database did not answer)."""
    up = GaugeMetricFamily("watibot_database_up", "1 when the database answered this scrape.",
                           value=0 if health is None else 1)
    if health is None:
        return [up]
    conversations = GaugeMetricFamily("watibot_conversations", "Conversations with something to do, by state.",
                                      labels=["state"])
    for state, column in (("buffering", "buffering"), ("overdue", "overdue"), ("in_flight", "in_flight"),
                          ("lease_expired", "leases_expired")):
        conversations.add_metric([state], health[column])
    unresolved = GaugeMetricFamily("watibot_bursts_unresolved", "Dead and attention bursts not replayed or pruned.",
                                   labels=["status"])
    unresolved.add_metric(["dead"], health["dead"])
    unresolved.add_metric(["attention"], health["attention"])
    by_key = {(row["series"], row["label"]): row for row in totals}
    outcomes = CounterMetricFamily("watibot_bursts", "Finished bursts by outcome (a replayed burst keeps the "
                                   "outcome it had), pruned ones included.", labels=["outcome"])
    for outcome in sorted({*BURST_OUTCOMES, *(label for series, label in by_key if series == "outcome")}):
        outcomes.add_metric([outcome], int(by_key.get(("outcome", outcome), {"count": 0})["count"]))
    last = health["last_burst_finished_at"]
    return [
        up,
        conversations,
        GaugeMetricFamily("watibot_overdue_seconds", "How late the most overdue unclaimed conversation is.",
                          value=float(health["max_lag_seconds"])),
        GaugeMetricFamily("watibot_buffered_messages", "Messages stored and not yet consumed by a burst.",
                          value=health["buffered_messages"]),
        GaugeMetricFamily("watibot_busy_workers", "Workers holding at least one claim right now.",
                          value=health["busy_workers"]),
        GaugeMetricFamily("watibot_last_burst_finished_timestamp_seconds", "When the latest burst finished.",
                          value=0 if last is None else last.timestamp()),
        unresolved,
        outcomes,
        CounterMetricFamily("watibot_bursts_replayed", "Bursts put back in the buffer by `watibot replay`.",
                            value=int(by_key.get(("replayed", "true"), {"count": 0})["count"])),
        _histogram("claim_lag", "Claim lag of finished bursts: start of the last attempt minus due time.", by_key),
        _histogram("agent_seconds", "Agent time of finished bursts that asked the agent.", by_key),
    ]


class _Snapshot:
    """A collector that yields families computed beforehand (the database is read asynchronously)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def process_registry() -> CollectorRegistry:
    """Every worker's process metrics in multiprocess mode, this process's otherwise (tests, embedding)."""
    if os.environ.get(MULTIPROCESS_DIRECTORY):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return _process_registry


class MetricsCache:
    """The /metrics body, built at most every `max_age` seconds by the workers of one `serve`.

    A scrape within `max_age` of the last reading gets that body; scrapes that arrive while a reading is in
    flight wait for it instead of starting their own (one database reading at a time, whatever the number of
    scrapers), and a scrape between readings costs only the HTTP exchange. Under `serve` (multiprocess mode) the
    body is shared through a file in PROMETHEUS_MULTIPROC_DIR, written by one worker at a time (an flock), so
    every worker of the host answers the same body: the numbers do not depend on which worker answers. A failed
    database reading (database down) is kept for `max_age` too, as `watibot_database_up 0`. The process counters
    are read with it, so they too are at most `max_age` old.
    """

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self._lock = asyncio.Lock()
        self._body: bytes | None = None
        self._read_at = 0.0
        self._next_slot = 0.0
        self.readings = 0

    async def pace(self) -> bool:
        """Wait for this scrape's turn: at most SCRAPES_PER_SECOND per process (after a burst of as many), the
        rest wait without using the CPU, so that a flood of scrapes cannot take the event loop from webhooks.
        False when the turn is more than MAX_SCRAPE_WAIT_SECONDS away (answer 429)."""
        now = time.monotonic()
        slot = max(self._next_slot, now - 1.0)
        if slot - now > MAX_SCRAPE_WAIT_SECONDS:
            return False
        self._next_slot = slot + 1.0 / SCRAPES_PER_SECOND
        if slot > now:
            await asyncio.sleep(slot - now)
        return True

    async def body(self, state: Any) -> bytes:
        """The last body, built again first when it is older than `max_age`."""
        async with self._lock:
            if self._body is not None and time.monotonic() - self._read_at < self.max_age:
                return self._body
            shared = _shared_body_path()
            if shared is None:
                return await self._build(state, None)
            with shared.with_suffix(".lock").open("a") as lock:
                body = _fresh_shared_body(shared, self.max_age)
                if body is not None:
                    return body
                deadline = time.monotonic() + state.settings.db_timeout_seconds + 1.0
                while True:  # another worker is reading: wait for its body rather than read too
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        await asyncio.sleep(0.02)
                        body = _fresh_shared_body(shared, self.max_age)
                        if body is not None:
                            return body
                        if time.monotonic() < deadline:
                            continue
                        return await self._build(state, None)
                    try:
                        return _fresh_shared_body(shared, self.max_age) or await self._build(state, shared)
                    finally:
                        fcntl.flock(lock, fcntl.LOCK_UN)

    async def _build(self, state: Any, shared: Path | None) -> bytes:
        health: dict[str, Any] | None
        try:
            health, totals = await state.stores.operators.metrics_snapshot()
        except DatabaseError:
            health, totals = None, []
        database = CollectorRegistry()
        database.register(_Snapshot(database_metrics(health, totals)))
        body = generate_latest(process_registry()) + generate_latest(database)
        self.readings += 1
        if shared is None:
            self._body, self._read_at = body, time.monotonic()
        else:
            partial = shared.with_suffix(f".{os.getpid()}")
            partial.write_bytes(body)
            partial.replace(shared)
        return body


def _shared_body_path() -> Path | None:
    """Where the workers of one `serve` share their last /metrics body (multiprocess mode only)."""
    directory = os.environ.get(MULTIPROCESS_DIRECTORY)
    return Path(directory) / "metrics-body.cache" if directory else None


def _fresh_shared_body(path: Path, max_age: float) -> bytes | None:
    """The shared body when another worker wrote it less than `max_age` seconds ago."""
    try:
        if time.time() - path.stat().st_mtime >= max_age:
            return None
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _authorized(request: Request, token: str) -> bool:
    """Whether the request carries `Authorization: Bearer <token>` (compared in constant time)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {CONTENT_TYPE_LATEST: {}}},
    401: {"description": "WATIBOT_METRICS_TOKEN is set and the request does not carry it"},
    429: {"description": "More scrapes than this worker answers (20 a second) for the next 5 s; see Retry-After"},
})
async def metrics(request: Request) -> Response:
    """Prometheus metrics of the whole service: database state and every worker's counters."""
    state = request.app.state
    cache: MetricsCache | None = getattr(state, "metrics_cache", None)
    if cache is None:
        cache = state.metrics_cache = MetricsCache(state.settings.metrics_cache_seconds)
    if not await cache.pace():  # unauthorized requests too: a flood of them is paced like any other
        return Response("too many scrapes: try again later\n", status_code=429, media_type="text/plain",
                        headers={"Retry-After": str(int(MAX_SCRAPE_WAIT_SECONDS))})
    token = state.settings.metrics_token
    if token is not None and not _authorized(request, token.get_secret_value()):
        return Response("unauthorized: send Authorization: Bearer <WATIBOT_METRICS_TOKEN>\n", status_code=401,
                        media_type="text/plain", headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    return Response(await cache.body(state), media_type=CONTENT_TYPE_LATEST)


class MetricsFastPath:
    """ASGI middleware: `GET /metrics` goes straight to `metrics`, past FastAPI's router and endpoint machinery,
    so that a flood of scrapes (answered from the cache) costs a webhook sharing the worker's event loop as
    little as possible. The route stays declared for the OpenAPI schema."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/metrics":
            response = await metrics(Request(scope, receive))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
