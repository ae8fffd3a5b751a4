"""`python -m bench.metrics_load [--bursts N] [--seconds S] [--scrapers C] [--rate R] [--out DIR]`: /metrics, loaded.

Issue 13's case 4: with 300k finished bursts one scrape cost 0.4-0.55 s of database work and 30 parallel scrapers
made webhooks take ~5 s (one 503, `sweep failed (TimeoutError)` in the sweeper). This run, on its own embedded
PostgreSQL 18 (fsync on) in a temporary directory, loopback only:

1. a database with `--bursts` finished bursts spread over the last 30 days (inserted synthetically, as the
   history part does: 20 per conversation, outcomes and claim lag / agent times varied), analyzed;
2. the database work of one reading, timed directly: the old full recount (`watibot.burst_fact_totals()` over
   every burst) against what a scrape reads now (health + rollup + the bursts since the mark), after the mark
   caught up;
3. `watibot serve --workers 2` (echo agent, fake WATI in its own process), webhooks at `--rate`/s (open loop,
   bench/loadgen.py in its own process) for `--seconds`: the idle baseline;
4. the same webhook load again with `--scrapers` parallel scrapers (closed loop, each scraping as fast as it is
   answered, in another process) hammering /metrics for the same time; steps 3 and 4 are repeated `--rounds`
   times, so that other work on the shared machine weighs on idle and loaded alike.

Asserts (exit 1 otherwise) and records: webhook p99 under scrapers within 2x the idle p99 of the same round
(median over rounds), no 503 or error, every scrape 200, no `sweep failed` in the serve log. Writes
`<out>/<date>-metrics.{json,md}`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.harness import ROOT, Children, Cluster, fake_outside, loadavg, serve_env, start_serve, summary_ms
from watibot.store.operators import BURST_TOTALS, HEALTH, ROLL_UP, ROLLUP_BATCH, ROLLUP_MARGIN_SECONDS

CHANNEL = "50322220000"
FULL_RECOUNT = """
SELECT series, label, sum(count)::bigint AS count, sum(sum)::float8 AS sum
FROM (SELECT * FROM watibot.burst_fact_totals() UNION ALL SELECT * FROM watibot.pruned_burst_totals) AS t
GROUP BY series, label
"""


async def fill(url: str, bursts: int) -> dict[str, Any]:
    """`bursts` finished bursts over the last 30 days, 20 per conversation; returns how long it took."""
    started = time.monotonic()
    conn = await asyncpg.connect(url)
    try:
        step = 50_000
        for low in range(0, bursts, step):
            high = min(bursts, low + step)
            async with conn.transaction():
                await conn.execute(
                    """INSERT INTO watibot.conversation (channel, customer, wa_id, last_position, answered_position)
                    SELECT $1, 'h' || c, 'h' || c, 40, 40 FROM generate_series($2::int / 20, ($3::int - 1) / 20) AS c
                    ON CONFLICT DO NOTHING""", CHANNEL, low, high)
                await conn.execute(
                    """INSERT INTO watibot.burst (channel, customer, status, after_position, through_position,
                                                  messages, fence, claimed_by, due_at, started_at, agent_started_at,
                                                  agent_finished_at, finished_at, prompt, reply, reply_parts,
                                                  parts_sent, sent_at)
                    SELECT $1, 'h' || (p / 20), s.status, (p % 20) * 2, (p % 20) * 2 + 2, 2, 1, 'bench:1:history',
                           t.at - (p % 7) * interval '0.4 s', t.at, t.at, t.at + (p % 13) * interval '0.3 s',
                           t.at + (p % 13) * interval '0.3 s' + interval '0.05 s',
                           'Hola, quiero reservar una habitación', 'Received 2 messages: 1. Hola 2. quiero reservar',
                           1, 1, t.at
                    FROM generate_series($2::int, $3::int - 1) AS p
                    CROSS JOIN LATERAL (SELECT now() - interval '30 days' * (1 - p::float8 / $4) - interval '10 minutes'
                                        AS at) AS t
                    CROSS JOIN LATERAL (SELECT CASE WHEN p % 50 = 0 THEN 'no_reply' WHEN p % 997 = 0 THEN 'dead'
                                                    ELSE 'sent' END AS status) AS s""",
                    CHANNEL, low, high, bursts)
        await conn.execute("VACUUM (ANALYZE) watibot.conversation, watibot.burst")
    finally:
        await conn.close()
    return {"bursts": bursts, "fill_seconds": round(time.monotonic() - started, 1)}


async def reading_costs(url: str, repeats: int) -> dict[str, Any]:
    """Database time of one reading: the old full recount and today's reading (after the mark caught up)."""
    conn = await asyncpg.connect(url)
    try:
        full = []
        for _ in range(repeats):
            began = time.perf_counter()
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await conn.fetchrow(HEALTH)
                await conn.fetch(FULL_RECOUNT)
            full.append(time.perf_counter() - began)
        catch_up_started = time.perf_counter()
        steps = 0
        while True:
            before = await conn.fetchval("SELECT rolled_through::text FROM watibot.burst_totals_mark")
            await conn.execute(ROLL_UP, ROLLUP_MARGIN_SECONDS, ROLLUP_BATCH)
            steps += 1
            if await conn.fetchval("SELECT rolled_through::text FROM watibot.burst_totals_mark") == before:
                break
        catch_up = time.perf_counter() - catch_up_started
        new = []
        for _ in range(repeats):
            began = time.perf_counter()
            await conn.execute(ROLL_UP, ROLLUP_MARGIN_SECONDS, ROLLUP_BATCH)
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await conn.fetchrow(HEALTH)
                rows = await conn.fetch(BURST_TOTALS)
            new.append(time.perf_counter() - began)
        recount = {(row["series"], row["label"]): row["count"] for row in await conn.fetch(FULL_RECOUNT)}
        rolled = {(row["series"], row["label"]): row["count"] for row in rows}
        since_mark = await conn.fetchval("SELECT count(*) FROM watibot.burst WHERE finished_at >= "
                                         "(SELECT rolled_through FROM watibot.burst_totals_mark)")
    finally:
        await conn.close()
    return {"full_recount": summary_ms(full), "rollup_reading": summary_ms(new),
            "catch_up_seconds": round(catch_up, 2), "catch_up_calls": steps, "bursts_since_mark": since_mark,
            "same_totals": recount == {key: value for key, value in rolled.items() if value}}


async def scrapers(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """`concurrency` closed-loop scrapers for `seconds`: statuses and scrape latency."""
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def loop() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                try:
                    async with session.get(f"{url}/metrics") as response:
                        await response.read()
                        statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
                    latencies.append(time.perf_counter() - began)
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return {"scrapes": len(latencies), "errors": errors, "statuses": statuses,
            "scrapes_per_second": round(len(latencies) / seconds, 1), "latency": summary_ms(latencies)}


def loadgen(url: str, seconds: float, rate: float, customers_offset: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", "--url", url, "--duration", str(seconds), "--rate", str(rate),
         "--connections", "64", "--customers", "2000", "--customer-offset", str(customers_offset)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str], seconds: float) -> dict[str, Any]:
    out, _ = process.communicate(timeout=seconds + 120)
    data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return data


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"loadavg_start": loadavg(), "settings": {
        "bursts": args.bursts, "seconds": args.seconds, "scrapers": args.scrapers, "webhook_rate": args.rate,
        "rounds": args.rounds, "workers": 2}}
    with tempfile.TemporaryDirectory(prefix="watibot-bench-metrics-") as temporary:
        work = Path(temporary)
        (work / "logs").mkdir()
        cluster = Cluster(work / "pg", durable=True)
        children = Children(work / "logs")
        try:
            cluster.start()
            database = cluster.fresh_database("metrics")
            result["fill"] = asyncio.run(fill(database, args.bursts))
            result["database_reading_ms"] = asyncio.run(reading_costs(database, 5))
            with fake_outside(children) as fakes_url:
                env = serve_env(database, WATIBOT_WATI_API_URL=f"{fakes_url}/1234", WATIBOT_BUFFER_SECONDS="1")
                serve, url = start_serve(children, "serve-2w", 2, env)
                finish(loadgen(url, 3, args.rate, 0), 3)  # warm-up: connections, plans, pools
                # Rounds of idle then loaded, so that other work on the shared box weighs on both alike.
                result["rounds"] = []
                for round_number in range(args.rounds):
                    offset = 100_000 * (round_number + 1)
                    idle = finish(loadgen(url, args.seconds, args.rate, offset), args.seconds)
                    hammering = subprocess.Popen(
                        [sys.executable, "-m", "bench.metrics_load", "--scrape-only", url, "--scrapers",
                         str(args.scrapers), "--seconds", str(args.seconds + 2)], cwd=ROOT, stdout=subprocess.PIPE,
                        text=True)
                    time.sleep(1.0)  # the scrapers are running before the measured webhooks start
                    loaded = finish(loadgen(url, args.seconds, args.rate, offset + 50_000), args.seconds)
                    result["rounds"].append({"idle": idle, "with_scrapers": loaded,
                                             "scrapers": finish(hammering, args.seconds),
                                             "p99_ratio": round(loaded["p99_ms"] / idle["p99_ms"], 2)})
                result["sweep_failed_lines"] = serve.count_in_log("sweep failed")
                result["error_lines"] = serve.count_in_log("ERROR")
                serve.stop()
        finally:
            children.stop_all()
            cluster.stop()
    rounds = result["rounds"]
    ratios = sorted(entry["p99_ratio"] for entry in rounds)
    result["p99_ratio_median"] = ratios[len(ratios) // 2]
    result["checks"] = {
        "webhook p99 with scrapers within 2x idle (median over rounds)": result["p99_ratio_median"] <= 2.0,
        "no 503 or error answer to a webhook": all(
            set(entry["with_scrapers"]["statuses"]) == {"200"} and entry["with_scrapers"]["errors"] == 0
            for entry in rounds),
        "every scrape answered 200": all(
            set(entry["scrapers"]["statuses"]) == {"200"} and entry["scrapers"]["errors"] == 0 for entry in rounds),
        "no 'sweep failed' in the serve log": result["sweep_failed_lines"] == 0,
        "rollup reading gives the full recount's totals": result["database_reading_ms"]["same_totals"],
    }
    result["loadavg_end"] = loadavg()
    return result


def markdown(result: dict[str, Any], stamp: str) -> str:
    reading = result["database_reading_ms"]
    settings = result["settings"]
    lines = [
        f"# /metrics under load ({stamp})", "",
        f"`python -m bench.metrics_load`: {result['fill']['bursts']:,} finished bursts over 30 days, "
        f"`watibot serve --workers 2`; {settings['rounds']} rounds of webhooks at {settings['webhook_rate']:g}/s "
        f"for {settings['seconds']:g} s idle, then the same with {settings['scrapers']} parallel closed-loop "
        f"scrapers on /metrics. Load average {result['loadavg_start']} at start, {result['loadavg_end']} at the "
        "end (2 cores shared with other work).", "",
        "| figure | value | same-run baseline | ratio |",
        "|---|---|---|---|",
        f"| database time of one reading, p50 / max ms | {reading['rollup_reading']['p50_ms']} / "
        f"{reading['rollup_reading']['max_ms']} (health + rollup + {reading['bursts_since_mark']} bursts since the "
        f"mark) | full recount (before 0010_hardening) {reading['full_recount']['p50_ms']} / "
        f"{reading['full_recount']['max_ms']} | "
        f"{reading['rollup_reading']['p50_ms'] / reading['full_recount']['p50_ms']:.3f}× |",
        f"| rollup catch-up after the upgrade (one time) | {reading['catch_up_seconds']} s in "
        f"{reading['catch_up_calls']} calls | | |",
    ]
    for number, entry in enumerate(result["rounds"], 1):
        idle, loaded, scrapes = entry["idle"], entry["with_scrapers"], entry["scrapers"]
        lines += [
            f"| round {number}: webhook p50 / p99 / max ms with scrapers | {loaded['p50_ms']} / {loaded['p99_ms']} / "
            f"{loaded['max_ms']} | idle {idle['p50_ms']} / {idle['p99_ms']} / {idle['max_ms']} | "
            f"p99 {entry['p99_ratio']}× |",
            f"| round {number}: webhook answers | {loaded['statuses']}, {loaded['errors']} errors | idle "
            f"{idle['statuses']}, {idle['errors']} errors | |",
            f"| round {number}: scrapes | {scrapes['scrapes']:,} ({scrapes['scrapes_per_second']}/s), "
            f"{scrapes['statuses']}, {scrapes['errors']} errors; p50 / p99 {scrapes['latency']['p50_ms']} / "
            f"{scrapes['latency']['p99_ms']} ms | | |",
        ]
    lines += [
        f"| webhook p99 ratio, median over rounds | {result['p99_ratio_median']}× | | ≤ 2× |",
        f"| `sweep failed` / ERROR lines in the serve log | {result['sweep_failed_lines']} / "
        f"{result['error_lines']} | | |",
        "", "Checks:", "",
        *[f"- {'✓' if ok else '✗'} {name}" for name, ok in result["checks"].items()], "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bursts", type=int, default=300_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--scrapers", type=int, default=30)
    parser.add_argument("--rate", type=float, default=50.0, help="webhooks per second (open loop)")
    parser.add_argument("--rounds", type=int, default=3, help="idle then loaded, this many times")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--scrape-only", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scrape_only:
        print(json.dumps(asyncio.run(scrapers(args.scrape_only, args.scrapers, args.seconds))), flush=True)
        return 0
    now = datetime.datetime.now(datetime.UTC)
    stamp = now.strftime("%Y-%m-%d")
    result = run(args)
    result["date"] = now.strftime("%Y-%m-%d %H:%M UTC")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stamp}-metrics.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    table = markdown(result, result["date"])
    (args.out / f"{stamp}-metrics.md").write_text(table)
    print(table)
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
