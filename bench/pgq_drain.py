"""The drain baseline: pgqueuer consuming pre-enqueued jobs on the same database, as its own process.

`--mode wati`: each job makes the same WATI call as a burst, through watibot's own `WatiClient` and
`wati_session` (aiohttp, the same limits). `--mode noop`: jobs do nothing, to show the coordination cost alone.
`--enqueue N` (once, before consumers start) installs pgqueuer's schema and enqueues N jobs.
Prints one JSON line: first job start, last job end (wall clock), jobs done and this process's CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import asyncpg
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
from pgqueuer.types import QueueExecutionMode

from watibot.clients import WatiClient, wati_session
from watibot.settings import Settings


async def enqueue(dsn: str, jobs: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        if not await queries.schema_is_installed():
            await queries.install()
        for start in range(0, jobs, 1000):
            count = min(1000, jobs - start)
            await queries.enqueue(["job"] * count, [str(start + i).encode() for i in range(count)], [0] * count)
    finally:
        await conn.close()


async def consume(dsn: str, mode: str, batch: int, concurrency: int, wati_url: str | None) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    manager = QueueManager(Queries(AsyncpgDriver(conn)))
    first: list[float] = []
    last = 0.0
    done = 0
    client = wati_session(15.0, concurrency)
    token = "bench-token"  # noqa: S105 - what the fake WATI accepts, not a secret
    settings = Settings(_env_file=None, wati_api_url=wati_url, wati_api_token=token)  # type: ignore[call-arg]
    wati = WatiClient(settings, client)
    cpu_at_first = 0.0

    @manager.entrypoint("job")
    async def job(job: Job) -> None:
        nonlocal last, done, cpu_at_first
        if not first:
            first.append(time.time())
            cpu_at_first = time.process_time()
        if mode == "wati":
            number = (job.payload or b"0").decode()
            await wati.send_text(f"5037{int(number):07d}", f"reply {number}", number)
        done += 1
        last = time.time()

    try:
        await manager.run(batch_size=batch, mode=QueueExecutionMode.drain,
                          max_concurrent_tasks=max(concurrency, 2 * batch))
    finally:
        await client.close()
        await conn.close()
    return {"first": first[0] if first else None, "last": last, "done": done,
            "cpu_seconds": round(time.process_time() - cpu_at_first, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--enqueue", type=int, default=0)
    parser.add_argument("--mode", choices=["wati", "noop"], default="noop")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--wati-url", default=None)
    args = parser.parse_args()
    if args.enqueue:
        asyncio.run(enqueue(args.dsn, args.enqueue))
        return
    print(json.dumps(asyncio.run(consume(args.dsn, args.mode, args.batch, args.concurrency, args.wati_url))),
          flush=True)


if __name__ == "__main__":
    main()
