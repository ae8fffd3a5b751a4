"""Webhook load generator: an aiohttp asyncio client, run as its own process; prints one JSON line.

- `--rate R`: open loop, request i is due at start + i/R; latency counts from that due moment, so a server that
  falls behind is charged for the queueing it causes (no coordinated omission).
- `--connections C` without `--rate`: closed loop, C requests in flight for `--duration` seconds (the fallback
  when `wrk` is not installed).
Every request is a distinct WATI text message (unique whatsappMessageId) from one of `--customers` customers
(waId 5037 + seven digits, `--customer-offset` added), stamped with the current time (so WATI's 24-hour session
window is open and replies are sent). `--record FILE` writes `[[waId, wall time acknowledged], …]`
for every 200 answer (the fleet part's reply lateness).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import PASSKEY, SAMPLE


class Bodies:
    """Distinct WATI message bodies: a run prefix and a counter make every id unique."""

    def __init__(self, customers: int, offset: int = 0) -> None:
        self.prefix = uuid.uuid4().hex[:10]
        self.customers = customers
        self.offset = offset
        self.count = 0
        template = dict(SAMPLE)
        template.update(whatsappMessageId="@MID@", id="@ID@", waId="@WA@", timestamp="@TS@")
        self.template = json.dumps(template)

    def next(self) -> bytes:
        return self.next_with_customer()[1]

    def next_with_customer(self) -> tuple[str, bytes]:
        self.count += 1
        number = self.count
        wa_id = f"5037{self.offset + number % self.customers:07d}"
        return wa_id, (self.template.replace("@MID@", f"wamid.{self.prefix}.{number}")
                       .replace("@ID@", f"{self.prefix}{number}")
                       .replace("@WA@", wa_id)
                       .replace("@TS@", str(int(time.time())))).encode()


async def run(url: str, rate: float | None, connections: int, duration: float, customers: int,
              offset: int = 0, acknowledged: list[tuple[str, float]] | None = None) -> dict[str, Any]:
    bodies = Bodies(customers, offset)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    target = f"{url}/webhook?passkey={PASSKEY}"
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(due: float) -> None:
            nonlocal errors
            wa_id, body = bodies.next_with_customer()
            try:
                async with session.post(target, data=body, headers=headers) as response:
                    await response.read()
                    statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
                latencies.append(time.perf_counter() - due)
                if acknowledged is not None and response.status == 200:
                    acknowledged.append((wa_id, time.time()))
            except (aiohttp.ClientError, TimeoutError):
                errors += 1

        started = time.perf_counter()
        if rate:
            tasks = set()
            total = int(rate * duration)
            for index in range(total):
                due = started + index / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        else:
            deadline = started + duration

            async def loop() -> None:
                while time.perf_counter() < deadline:
                    await one(time.perf_counter())

            await asyncio.gather(*(loop() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)

    def pick(fraction: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))] * 1000, 2)

    return {
        "requests": len(latencies), "errors": errors, "statuses": statuses, "seconds": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1), "p50_ms": pick(0.50), "p95_ms": pick(0.95),
        "p99_ms": pick(0.99), "max_ms": pick(1.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, default=None, help="requests per second (open loop)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--customer-offset", type=int, default=0, help="added to every customer number")
    parser.add_argument("--record", type=Path, default=None, help="write [[waId, acknowledged wall time], ...]")
    args = parser.parse_args()
    acknowledged: list[tuple[str, float]] | None = [] if args.record else None
    result = asyncio.run(run(args.url, args.rate, args.connections, args.duration, args.customers,
                             args.customer_offset, acknowledged))
    if args.record:
        args.record.write_text(json.dumps(acknowledged))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
