"""The six benchmark parts. Each returns a JSON-able dict with its figures next to their same-run baselines."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import psycopg

from bench.harness import (
    CHANNEL,
    PASSKEY,
    ROOT,
    SAMPLE,
    Children,
    Cluster,
    CpuMeter,
    RssSampler,
    loadavg,
    serve_env,
    sql,
    start_bare,
    start_serve,
    summary_ms,
    wait_until,
    wrk_available,
)
from watibot.store.claims import CLAIM_DUE


@dataclass
class Scale:
    """How big each part is: `smoke` runs in seconds (CI), `full` in about a minute or two per part."""

    smoke: bool
    ingest_workers: list[int] = field(default_factory=lambda: [1, 2, 4])
    ingest_seconds: float = 10.0
    rate: float = 500.0
    rate_seconds: float = 10.0
    drain_workers: list[int] = field(default_factory=lambda: [1, 2, 4])
    drain_conversations: int = 2000
    drain_messages: int = 3
    slow_workers: int = 4
    slow_conversations: int = 2000
    slow_delay: float = 2.0
    slow_concurrency: int = 400
    timer_workers: int = 4
    timer_conversations: int = 300
    timer_spread: float = 8.0
    timer_load_rate: float = 500.0
    history_levels: list[int] = field(default_factory=lambda: [10_000, 100_000, 1_000_000])
    history_buffered: int = 10_000
    claim_iterations: int = 200
    # fleet (bench/fleet.py): idle sweepers, CPU per burst by fleet size, cross-host reply lateness
    fleet_idle_workers: list[int] = field(default_factory=lambda: [0, 5, 20, 50])
    fleet_idle_tree_workers: int = 5
    fleet_idle_seconds: float = 20.0
    fleet_idle_settle: float = 5.0
    fleet_layouts: list[list[int]] = field(default_factory=lambda: [[1, 1], [2, 2, 2]])
    fleet_conversations: int = 2000
    fleet_messages: int = 3
    fleet_repeats: int = 2
    fleet_rate: float = 50.0
    fleet_rate_seconds: float = 20.0
    fleet_buffer_seconds: float = 1.0
    profile: bool = True

    @classmethod
    def small(cls) -> Scale:
        return cls(
            smoke=True, ingest_workers=[1], ingest_seconds=1.5, rate=100.0, rate_seconds=1.5, drain_workers=[1],
            drain_conversations=100, drain_messages=2, slow_workers=1, slow_conversations=40, slow_delay=0.3,
            slow_concurrency=50, timer_workers=1, timer_conversations=20, timer_spread=2.0, timer_load_rate=50.0,
            history_levels=[1_000, 10_000], history_buffered=1_000, claim_iterations=20, profile=False,
            fleet_idle_workers=[0, 2], fleet_idle_tree_workers=2, fleet_idle_seconds=2.0, fleet_idle_settle=1.0,
            fleet_layouts=[[1, 1], [1, 1, 1]], fleet_conversations=100, fleet_messages=2, fleet_repeats=1,
            fleet_rate=20.0, fleet_rate_seconds=2.0,
        )


@dataclass
class Context:
    cluster: Cluster
    children: Children
    scale: Scale
    fakes_url: str
    work_dir: Path
    profiles: dict[str, str] = field(default_factory=dict)


def _stamp(result: dict[str, Any], started: float) -> dict[str, Any]:
    result["loadavg_end"] = loadavg()
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


# -- profiling ----------------------------------------------------------------------------------------------------

class Profiler:
    """py-spy recording one process (non-blocking sampling) until stopped; summarised as top frames."""

    def __init__(self, context: Context, name: str, pid: int) -> None:
        self.context = context
        self.name = name
        self.output = context.work_dir / f"profile-{name}.txt"
        self.process: subprocess.Popen[bytes] | None = None
        py_spy = Path(sys.executable).with_name("py-spy")
        if context.scale.profile and py_spy.exists():
            self.process = subprocess.Popen(
                [str(py_spy), "record", "--nonblocking", "-r", "200", "-f", "raw", "-o", str(self.output),
                 "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return
        if self.output.exists():
            self.context.profiles[self.name] = summarise_profile(self.output)


def summarise_profile(path: Path, top: int = 14) -> str:
    """Self and inclusive sample shares by function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")[2:]]  # drop process; thread
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples (200 Hz, py-spy --nonblocking)", "self time:"]
    lines += [f"  {100 * count / total:5.1f}%  {frame}" for frame, count in own.most_common(top)]
    lines.append("inclusive (watibot, asyncpg, httpx, httpcore, uvicorn, starlette, fastapi frames):")
    wanted = ("watibot", "asyncpg", "httpx", "httpcore", "h11", "uvicorn", "starlette", "fastapi", "pydantic")
    ours = [(frame, count) for frame, count in inclusive.most_common() if any(word in frame for word in wanted)]
    lines += [f"  {100 * count / total:5.1f}%  {frame}" for frame, count in ours[:top]]
    return "\n".join(lines)


# -- load ---------------------------------------------------------------------------------------------------------

def _template_file(context: Context) -> Path:
    path = context.work_dir / "webhook-body.json"
    if not path.exists():
        body = dict(SAMPLE)
        body.update(whatsappMessageId="@MID@", id="@ID@", waId="@WA@")
        path.write_text(json.dumps(body))
    return path


def closed_load(context: Context, url: str, seconds: float, connections: int = 64) -> dict[str, Any]:
    """Saturating load from its own process: wrk (-t2 -c64) if installed, else the aiohttp client."""
    if wrk_available():
        prefix = os.urandom(4).hex()
        result = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
             "-s", str(ROOT / "bench" / "webhook.lua"), f"{url}/webhook?passkey={PASSKEY}", "--",
             str(_template_file(context)), prefix],
            capture_output=True, text=True, check=True, timeout=seconds + 60,
        )
        line = next(line for line in result.stdout.splitlines() if line.startswith("WRKJSON "))
        data = json.loads(line.removeprefix("WRKJSON "))
        errors = sum(data[key] for key in ("connect_errors", "read_errors", "write_errors", "status_errors",
                                           "timeouts"))
        return {
            "tool": f"wrk -t2 -c{connections}", "requests": data["requests"],
            "rps": round(data["requests"] / (data["duration_us"] / 1e6), 1), "errors": errors,
            "p50_ms": data["p50_us"] / 1000, "p95_ms": data["p95_us"] / 1000, "p99_ms": data["p99_us"] / 1000,
            "max_ms": data["max_us"] / 1000,
        }
    result = loadgen(url, seconds, connections=connections)
    result["tool"] = f"aiohttp client, {connections} connections"
    return result


def loadgen(url: str, seconds: float, *, rate: float | None = None, connections: int = 64) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.loadgen", "--url", url, "--duration", str(seconds),
            "--connections", str(connections)]
    if rate:
        argv += ["--rate", str(rate)]
    output = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT, timeout=seconds + 60)
    data: dict[str, Any] = json.loads(output.stdout.strip().splitlines()[-1])
    ok = int(data["statuses"].get("200", 0))
    data["errors"] = data["errors"] + data["requests"] - ok
    return data


def _rss_mb(processes: list[psutil.Process]) -> list[float]:
    values = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            values.append(round(process.memory_info().rss / 2**20, 1))
    return sorted(values)


# -- 1. ingest ----------------------------------------------------------------------------------------------------

def ingest(context: Context) -> dict[str, Any]:
    """Webhook throughput and latency, watibot (sweeper off) vs the bare endpoint, with 1, 2, 4 workers."""
    started, scale = time.monotonic(), context.scale
    result: dict[str, Any] = {"loadavg_start": loadavg(), "throughput": [], "fixed_rate": {}, "memory": {}}
    for workers in scale.ingest_workers:
        database = context.cluster.fresh_database("ingest")
        serve, url = start_serve(context.children, f"serve-ingest-{workers}w", workers,
                                 serve_env(database, WATIBOT_SWEEPER="false"))
        idle = _rss_mb(serve.workers())
        closed_load(context, url, 1)  # warm-up: pools, prepared statements
        with RssSampler(serve.workers) as rss:
            measured = closed_load(context, url, scale.ingest_seconds)
        row = {"workers": workers, "watibot": measured, "watibot_rss_idle_mb": idle,
               "watibot_rss_load_mb": rss.peak_mb()}
        if workers == max(scale.ingest_workers):
            row["watibot_rate"] = loadgen(url, scale.rate_seconds, rate=scale.rate)
            if not scale.smoke:
                serve.stop()
                row["what_if"] = _ingest_what_ifs(context, database, workers)
                serve, url = start_serve(context.children, f"serve-ingest-{workers}w-again", workers,
                                         serve_env(database, WATIBOT_SWEEPER="false"))
            if scale.profile:
                profiler = Profiler(context, f"ingest-{workers}w-worker", serve.workers()[0].pid)
                closed_load(context, url, 6)
                profiler.stop()
        row["stored"] = sql(database, "SELECT count(*) FROM watibot.message")[0][0]
        serve.stop()
        context.cluster.drop(database)

        bare, bare_url = start_bare(context.children, workers)
        closed_load(context, bare_url, 1)
        with RssSampler(bare.workers) as rss:
            row["bare"] = closed_load(context, bare_url, scale.ingest_seconds)
        row["bare_rss_load_mb"] = rss.peak_mb()
        if workers == max(scale.ingest_workers):
            row["bare_rate"] = loadgen(bare_url, scale.rate_seconds, rate=scale.rate)
        bare.stop()
        row["ratio"] = round(row["watibot"]["rps"] / row["bare"]["rps"], 3)
        result["throughput"].append(row)
    return _stamp(result, started)


def _ingest_what_ifs(context: Context, database: str, workers: int) -> dict[str, Any]:
    """The recommended changes applied from outside (bench/what_if.py, a DSN): throughput and 500/s latency."""
    scale = context.scale
    variants = {
        "unix_socket": (False, context.cluster.socket_url(database)),
        "pool_without_reset": (True, database),
        "unix_socket_and_pool_without_reset": (True, context.cluster.socket_url(database)),
    }
    results = {}
    for name, (what_if, url) in variants.items():
        serve, base = start_serve(context.children, f"serve-ingest-{name}", workers,
                                  serve_env(url, WATIBOT_SWEEPER="false"), what_if=what_if)
        closed_load(context, base, 1)
        measured = closed_load(context, base, scale.ingest_seconds)
        measured["rate"] = loadgen(base, scale.rate_seconds, rate=scale.rate)
        results[name] = measured
        serve.stop()
    return results


# -- 2. drain -----------------------------------------------------------------------------------------------------

def insert_due(database: str, prefix: str, conversations: int, messages: int, due_sql: str = "now()") -> None:
    """M conversations with K buffered messages each, due at `due_sql` (an SQL expression over g)."""
    payload = json.dumps(SAMPLE)
    with psycopg.connect(database) as conn:
        conn.execute(
            f"""INSERT INTO watibot.conversation (channel, customer, wa_id, due_at, buffer_started_at,
                                                  last_position, last_customer_message_at)
            SELECT %s, %s || g, '5037' || lpad(g::text, 7, '0'), {due_sql}, now() - interval '1 minute', %s,
                   now() - interval '1 minute'
            FROM generate_series(1, %s) AS g""",  # noqa: S608 - due_sql is ours, never input
            (CHANNEL, prefix, messages, conversations),
        )
        conn.execute(
            """INSERT INTO watibot.message (channel, customer, position, provider_message_id, wati_id, type, text,
                                            wati_timestamp, payload, received_at)
            SELECT %s, %s || g, k, 'wamid.' || %s || g || '.' || k, %s || g || '.' || k, 'text',
                   'message ' || k || ' of customer ' || g, now() - interval '1 minute' + k * interval '1 s',
                   %s::jsonb, now() - interval '1 minute'
            FROM generate_series(1, %s) AS g, generate_series(1, %s) AS k""",
            (CHANNEL, prefix, prefix, prefix, payload, conversations, messages),
        )
        conn.commit()


def _finished(database: str, prefix: str) -> int:
    return int(sql(database, "SELECT count(*) FROM watibot.burst WHERE finished_at IS NOT NULL AND customer LIKE %s",
                   prefix + "%")[0][0])


def _burst_rate(database: str, prefix: str) -> dict[str, Any]:
    row = sql(database, """
        SELECT count(*), EXTRACT(EPOCH FROM max(finished_at) - min(started_at))::float8,
               count(*) FILTER (WHERE status = 'sent'),
               percentile_cont(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM finished_at - started_at)),
               count(DISTINCT split_part(claimed_by, ':', 2))
        FROM watibot.burst WHERE customer LIKE %s""", prefix + "%")[0]
    count, span, sent, median, workers = row
    return {"bursts": count, "sent": sent, "span_seconds": round(span or 0.0, 3),
            "bursts_per_second": round(count / span, 1) if span else None,
            "burst_duration_p50_ms": round((median or 0.0) * 1000, 1), "worker_processes_used": workers}


def _statements(database: str, bursts: int) -> dict[str, Any]:
    rows = sql(database, """
        SELECT calls, total_exec_time, mean_exec_time, regexp_replace(left(query, 90), '\\s+', ' ', 'g')
        FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
        WHERE d.datname = current_database() AND query NOT ILIKE '%%pg_stat_statements%%'
        ORDER BY total_exec_time DESC""")
    calls = sum(row[0] for row in rows)
    return {
        "statements_per_burst": round(calls / bursts, 1) if bursts else None,
        "exec_ms_per_burst": round(sum(row[1] for row in rows) / bursts, 3) if bursts else None,
        "top": [{"calls": row[0], "total_ms": round(row[1], 1), "mean_ms": round(row[2], 3), "query": row[3]}
                for row in rows[:25]],
    }


def _configure_fakes(context: Context, agent_delay: float) -> None:
    httpx.post(f"{context.fakes_url}/config", json={"agent_delay": agent_delay}, timeout=5).raise_for_status()


def _fake_stats(context: Context, calls: bool = False) -> dict[str, Any]:
    response = httpx.get(f"{context.fakes_url}/stats", params={"calls": "1"} if calls else {}, timeout=30)
    return dict(response.json())


def _pgqueuer(context: Context, database: str, mode: str, jobs: int, processes: int) -> dict[str, Any]:
    subprocess.run([sys.executable, "-m", "bench.pgq_drain", "--dsn", database, "--enqueue", str(jobs)],
                   check=True, cwd=ROOT, capture_output=True, timeout=120)
    db_cpu = CpuMeter(context.cluster.server_processes)
    db_cpu.start()
    consumers = [
        subprocess.Popen([sys.executable, "-m", "bench.pgq_drain", "--dsn", database, "--mode", mode,
                          "--batch", "100", "--concurrency", "100", "--wati-url", f"{context.fakes_url}/1234"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    outputs = []
    for consumer in consumers:
        stdout, stderr = consumer.communicate(timeout=300)
        if consumer.returncode != 0:
            raise RuntimeError(f"pgqueuer consumer failed: {stderr[-2000:]}")
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    database_cpu = db_cpu.stop()
    firsts = [output["first"] for output in outputs if output["first"]]
    span = max(output["last"] for output in outputs) - min(firsts)
    done = sum(output["done"] for output in outputs)
    cpu = sum(output["cpu_seconds"] for output in outputs)
    return {"mode": mode, "processes": processes, "batch": 100, "jobs": done, "span_seconds": round(span, 3),
            "jobs_per_second": round(done / span, 1), "app_cpu_ms_per_job": round(1000 * cpu / done, 3),
            "db_cpu_ms_per_job": round(1000 * database_cpu / done, 3)}


def _drain_once(context: Context, database: str, workers: int, prefix: str, what_if: bool) -> dict[str, Any]:
    """One more drain of the same size on the same database, through bench/what_if.py over the Unix socket."""
    scale = context.scale
    url = context.cluster.socket_url(database) if what_if else database
    serve, _ = start_serve(context.children, f"serve-drain-{prefix}", workers, serve_env(
        url, WATIBOT_WATI_API_URL=f"{context.fakes_url}/1234", WATIBOT_CONCURRENCY="100",
        WATIBOT_CLAIM_BATCH="100"), what_if=what_if)
    sql(database, "SELECT pg_stat_statements_reset()")
    app_cpu, db_cpu = CpuMeter(serve.workers), CpuMeter(context.cluster.server_processes)
    app_cpu.start()
    db_cpu.start()
    insert_due(database, prefix, scale.drain_conversations, scale.drain_messages)
    wait_until(lambda: _finished(database, prefix) >= scale.drain_conversations, 180, 0.2, "drain what-if")
    app_seconds, db_seconds = app_cpu.stop(), db_cpu.stop()
    result = _burst_rate(database, prefix)
    result["app_cpu_ms_per_burst"] = round(1000 * app_seconds / result["bursts"], 3)
    result["db_cpu_ms_per_burst"] = round(1000 * db_seconds / result["bursts"], 3)
    result["statements"] = _statements(database, result["bursts"])
    serve.stop()
    return result


def drain(context: Context) -> dict[str, Any]:
    """M due conversations × K messages through echo agent + fake WATI, vs pgqueuer with the same WATI call."""
    started, scale = time.monotonic(), context.scale
    result: dict[str, Any] = {"loadavg_start": loadavg(), "conversations": scale.drain_conversations,
                              "messages_per_conversation": scale.drain_messages, "runs": []}
    _configure_fakes(context, 0.0)
    for workers in scale.drain_workers:
        database = context.cluster.fresh_database("drain")
        serve, _ = start_serve(context.children, f"serve-drain-{workers}w", workers, serve_env(
            database, WATIBOT_WATI_API_URL=f"{context.fakes_url}/1234", WATIBOT_CONCURRENCY="100",
            WATIBOT_CLAIM_BATCH="100"))
        sql(database, "SELECT pg_stat_statements_reset()")
        app_cpu, db_cpu = CpuMeter(serve.workers), CpuMeter(context.cluster.server_processes)
        prefix = f"d{workers}w"
        profiler = None
        if workers == max(scale.drain_workers):
            profiler = Profiler(context, f"drain-{workers}w-worker", serve.workers()[0].pid)
        app_cpu.start()
        db_cpu.start()
        with RssSampler(serve.workers) as rss:
            insert_due(database, prefix, scale.drain_conversations, scale.drain_messages)
            wait_until(lambda database=database, prefix=prefix: _finished(database, prefix)
                       >= scale.drain_conversations, 180, 0.2, "drain")
        app_seconds, db_seconds = app_cpu.stop(), db_cpu.stop()
        if profiler:
            profiler.stop()
        run = {"workers": workers, "watibot": _burst_rate(database, prefix), "rss_load_mb": rss.peak_mb()}
        bursts = run["watibot"]["bursts"]
        run["watibot"]["app_cpu_ms_per_burst"] = round(1000 * app_seconds / bursts, 3)
        run["watibot"]["db_cpu_ms_per_burst"] = round(1000 * db_seconds / bursts, 3)
        run["watibot"]["statements"] = _statements(database, bursts)
        run["errors_logged"] = serve.count_in_log("ERROR")
        serve.stop()
        if workers == max(scale.drain_workers) and not scale.smoke:
            run["what_if_socket_no_reset"] = _drain_once(context, database, workers, f"x{workers}w", what_if=True)
        if importlib.util.find_spec("pgqueuer") is None:
            run["skipped"] = "pgqueuer baseline: pgqueuer not installed (pip install -e '.[bench]')"
        else:
            run["pgqueuer_wati"] = _pgqueuer(context, database, "wati", scale.drain_conversations, workers)
            run["pgqueuer_noop"] = _pgqueuer(context, database, "noop", scale.drain_conversations, workers)
            run["ratio"] = round(run["watibot"]["bursts_per_second"] / run["pgqueuer_wati"]["jobs_per_second"], 3)
        result["runs"].append(run)
        context.cluster.drop(database)
    return _stamp(result, started)


# -- 3. slow agent ------------------------------------------------------------------------------------------------

def _slow_run(context: Context, label: str, agent_env: dict[str, str]) -> dict[str, Any]:
    scale = context.scale
    _configure_fakes(context, scale.slow_delay)
    database = context.cluster.fresh_database("slow")
    serve, _ = start_serve(context.children, f"serve-slow-{label}", scale.slow_workers, serve_env(
        database, WATIBOT_WATI_API_URL=f"{context.fakes_url}/1234", WATIBOT_CONCURRENCY=str(scale.slow_concurrency),
        **agent_env))
    profiler = Profiler(context, f"slow-agent-{label}-worker", serve.workers()[0].pid) if scale.profile else None
    result: dict[str, Any] = {"agent_client": label}
    with RssSampler(serve.workers) as rss:
        insert_due(database, "s", scale.slow_conversations, 1)
        try:
            wait_until(lambda: _finished(database, "s") >= scale.slow_conversations, 150, 0.25, "slow")
            result["completed"] = True
        except TimeoutError:
            result["completed"] = False
    if profiler:
        profiler.stop()
    stats = _fake_stats(context)
    result["agent_peak_in_flight"] = stats["agent_peak"]
    result["agent_calls"] = stats["agent"]
    result["watibot"] = _burst_rate(database, "s")
    result["statuses"] = dict(sql(database, "SELECT status, count(*) FROM watibot.burst GROUP BY status"))
    result["not_sent"] = scale.slow_conversations - result["watibot"]["sent"]
    result["errors_logged"] = serve.count_in_log("ERROR")
    result["warnings_logged"] = serve.count_in_log("WARNING")
    result["log_excerpt"] = [line[:300] for line in serve.log_tail(400).splitlines()
                             if "WARNING" in line or "ERROR" in line][:5]
    result["rss_load_mb"] = rss.peak_mb()
    serve.stop()
    context.cluster.drop(database)
    _configure_fakes(context, 0.0)
    return result


def slow_agent(context: Context) -> dict[str, Any]:
    """An http agent answering after 2 s: bursts in flight and bursts/s with 4 workers.

    The measured figure uses watibot's own `http` agent (httpx). A what-if run (full runs only) calls the same
    agent through aiohttp via the `package.module:function` extension point, to show what the HTTP client costs.
    """
    started, scale = time.monotonic(), context.scale
    result: dict[str, Any] = {"loadavg_start": loadavg(), "workers": scale.slow_workers,
                              "concurrency_per_worker": scale.slow_concurrency, "agent_delay_s": scale.slow_delay,
                              "conversations": scale.slow_conversations}
    capacity = min(scale.slow_conversations, scale.slow_workers * scale.slow_concurrency)
    result["ideal_bursts_per_second"] = round(capacity / scale.slow_delay, 1)
    http_agent = {"WATIBOT_AGENT": "http", "WATIBOT_AGENT_URL": f"{context.fakes_url}/agent"}
    result.update(_slow_run(context, "httpx", http_agent))
    if not scale.smoke:
        # What-ifs: a pool big enough for the bursts in flight (configuration only), then also the agent called
        # through aiohttp (the `package.module:function` extension point) instead of httpx.
        pool = {"WATIBOT_DB_POOL_SIZE": "60"}
        result["what_if_pool_60"] = _slow_run(context, "httpx-pool60", http_agent | pool)
        result["what_if_pool_60_aiohttp_agent"] = _slow_run(context, "aiohttp-pool60", pool | {
            "WATIBOT_AGENT": "bench.agents:aiohttp_agent", "BENCH_AGENT_URL": f"{context.fakes_url}/agent"})
    return _stamp(result, started)


# -- 4. timer precision -------------------------------------------------------------------------------------------

def _lateness(context: Context, database: str, prefix: str) -> dict[str, Any]:
    calls = {burst: at for burst, at in _fake_stats(context, calls=True)["calls"]}
    rows = sql(database, """SELECT id, EXTRACT(EPOCH FROM due_at)::float8,
                                 EXTRACT(EPOCH FROM started_at - due_at)::float8
                          FROM watibot.burst WHERE customer LIKE %s""", prefix + "%")
    lateness = [calls[burst] - due for burst, due, _ in rows if burst in calls]
    claim_lag = [lag for _, _, lag in rows]
    return {"agent_call_lateness": summary_ms(lateness), "claim_lag_db": summary_ms(claim_lag),
            "early": sum(1 for value in lateness if value < 0)}


def timer(context: Context) -> dict[str, Any]:
    """Lateness of the agent call after due_at, idle and under ingest load."""
    started, scale = time.monotonic(), context.scale
    result: dict[str, Any] = {"loadavg_start": loadavg(), "workers": scale.timer_workers,
                              "conversations": scale.timer_conversations, "spread_s": scale.timer_spread}
    _configure_fakes(context, 0.0)
    database = context.cluster.fresh_database("timer")
    serve, url = start_serve(context.children, "serve-timer", scale.timer_workers, serve_env(
        database, WATIBOT_WATI_API_URL=f"{context.fakes_url}/1234", WATIBOT_AGENT="http",
        WATIBOT_AGENT_URL=f"{context.fakes_url}/agent", WATIBOT_BUFFER_SECONDS="600"))
    due = f"now() + interval '2 s' + random() * interval '{scale.timer_spread} s'"
    count = scale.timer_conversations
    timeout = scale.timer_spread + 60

    insert_due(database, "i", count, 1, due)
    wait_until(lambda: _finished(database, "i") >= count, timeout, 0.25, "timer idle")
    result["idle"] = _lateness(context, database, "i")

    load = subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", "--url", url, "--rate", str(scale.timer_load_rate),
         "--duration", str(scale.timer_spread + 4)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    insert_due(database, "l", count, 1, due)
    wait_until(lambda: _finished(database, "l") >= count, timeout, 0.25, "timer under load")
    stdout, _ = load.communicate(timeout=120)
    result["load"] = _lateness(context, database, "l")
    result["load"]["ingest"] = json.loads(stdout.strip().splitlines()[-1])
    serve.stop()
    context.cluster.drop(database)
    return _stamp(result, started)


# -- 5. scale of history ------------------------------------------------------------------------------------------

HISTORY_ID_OFFSET = 10_000_000


async def _history(context: Context, database: str) -> dict[str, Any]:
    scale = context.scale
    payload = json.dumps(SAMPLE)
    conn = await asyncpg.connect(database)
    levels = []
    try:
        await conn.execute(
            """INSERT INTO watibot.conversation (channel, customer, wa_id, due_at, buffer_started_at, last_position,
                                                 last_customer_message_at)
            SELECT $1, 'b' || g, '5037' || lpad(g::text, 7, '0'), now() - interval '1 hour' + g * interval '1 ms',
                   now() - interval '1 hour', 1, now() - interval '2 hours'
            FROM generate_series(1, $2::int) AS g""", CHANNEL, scale.history_buffered)
        await conn.execute(
            """INSERT INTO watibot.message (channel, customer, position, provider_message_id, wati_id, type, text,
                                            payload, received_at, wati_timestamp)
            SELECT $1, 'b' || g, 1, 'wamid.b' || g, 'b' || g, 'text', 'buffered ' || g, $2::text::jsonb,
                   now() - interval '2 hours', now() - interval '2 hours'
            FROM generate_series(1, $3::int) AS g""", CHANNEL, payload, scale.history_buffered)
        have = 0
        for level in scale.history_levels:
            fill_started = time.monotonic()
            while have < level:
                upto = min(level, have + 100_000)
                await _add_history(conn, have, upto, payload)
                have = upto
            fill_seconds = time.monotonic() - fill_started
            # The history rows carry explicit ids: move the identities past them, as real inserts would have.
            await conn.execute("""
                SELECT setval(pg_get_serial_sequence('watibot.burst', 'id'), max(id)) FROM watibot.burst;
                SELECT setval(pg_get_serial_sequence('watibot.message', 'id'), max(id)) FROM watibot.message""")
            await conn.execute("VACUUM (ANALYZE) watibot.conversation, watibot.message, watibot.burst")
            measured = await _measure_claim(conn, scale.claim_iterations)
            sizes = await conn.fetchrow("""
                SELECT pg_total_relation_size('watibot.message') AS message,
                       pg_total_relation_size('watibot.burst') AS burst,
                       pg_total_relation_size('watibot.conversation') AS conversation,
                       pg_database_size(current_database()) AS database""")
            levels.append({"processed_messages": level, "processed_bursts": level // 2,
                           "fill_seconds": round(fill_seconds, 1), **measured,
                           "size_mb": {key: round(value / 2**20, 1) for key, value in dict(sizes).items()}})
    finally:
        await conn.close()
    top = levels[-1]
    per_million = (top["size_mb"]["message"] + top["size_mb"]["burst"]) * 1_000_000 / top["processed_messages"]
    return {"levels": levels, "mb_per_million_messages": round(per_million, 1),
            "ratio": round(top["claim"]["p50_ms"] / levels[0]["claim"]["p50_ms"], 3)}


async def _add_history(conn: asyncpg.Connection, low: int, high: int, payload: str) -> None:
    """Processed messages [low, high): 2 per burst, 20 per conversation, all consumed, conversations idle."""
    async with conn.transaction():
        await conn.execute(
            """INSERT INTO watibot.conversation (channel, customer, wa_id, last_position, answered_position)
            SELECT $1, 'h' || c, 'h' || c, 20, 20 FROM generate_series($2::int / 20, ($3::int - 1) / 20) AS c
            ON CONFLICT DO NOTHING""", CHANNEL, low, high)
        await conn.execute(
            """INSERT INTO watibot.burst (id, channel, customer, status, after_position, through_position, messages,
                                          fence, claimed_by, due_at, started_at, finished_at, prompt, reply,
                                          reply_parts, parts_sent, sent_at)
            OVERRIDING SYSTEM VALUE
            SELECT p + 1, $1, 'h' || (p * 2 / 20), 'sent', (2 * p) % 20, (2 * p) % 20 + 2, 2, 1,
                   'bench:1:history', now(), now(), now(), 'Hola, quiero reservar una habitación',
                   'Received 2 messages: 1. Hola 2. quiero reservar', 1, 1, now()
            FROM generate_series($2::int / 2, ($3::int - 1) / 2) AS p
            ON CONFLICT DO NOTHING""", CHANNEL, low, high)
        await conn.execute(
            """INSERT INTO watibot.message (id, channel, customer, position, provider_message_id, wati_id, type, text,
                                            wati_timestamp, payload, received_at)
            OVERRIDING SYSTEM VALUE
            SELECT $4 + g, $1, 'h' || (g / 20), g % 20 + 1, 'wamid.h' || g, 'h' || g, 'text',
                   'Hola, quiero reservar una habitación ' || g, now(), $5::text::jsonb, now()
            FROM generate_series($2::int, $3::int - 1) AS g""", CHANNEL, low, high, HISTORY_ID_OFFSET, payload)


async def _measure_claim(conn: asyncpg.Connection, iterations: int) -> dict[str, Any]:
    """CLAIM_DUE (batch 50: watibot.claim_due claims and begins the fresh bursts), rolled back; its inner plan
    through auto_explain (the statement runs inside the function, where EXPLAIN does not reach)."""
    claim_times = []
    for _ in range(iterations):
        transaction = conn.transaction()
        await transaction.start()
        try:
            began = time.perf_counter()
            await conn.fetch(CLAIM_DUE, 50, "bench:1:claim", 30.0, True)
            claim_times.append(time.perf_counter() - began)
        finally:
            await transaction.rollback()
    plans: list[str] = []
    conn.add_log_listener(lambda _conn, message: plans.append(str(message.message)))
    transaction = conn.transaction()
    await transaction.start()
    try:
        for setting in ("LOAD 'auto_explain'", "SET LOCAL auto_explain.log_min_duration = 0",
                        "SET LOCAL auto_explain.log_nested_statements = on", "SET LOCAL auto_explain.log_analyze = on",
                        "SET LOCAL auto_explain.log_buffers = on", "SET LOCAL auto_explain.log_level = notice"):
            await conn.execute(setting)
        await conn.fetch(CLAIM_DUE, 50, "bench:1:claim", 30.0, True)
    finally:
        await transaction.rollback()
    plan_lines = [line for plan in plans if "SKIP LOCKED" in plan for line in plan.splitlines()]
    return {"claim": summary_ms(claim_times), "claim_plan": plan_lines,
            "claim_uses_due_index": any("conversation_due_idx" in line for line in plan_lines)}


def history(context: Context) -> dict[str, Any]:
    """Claim latency and plan with 10k/100k/1M processed messages and 10k buffered; size per million."""
    started = time.monotonic()
    result: dict[str, Any] = {"loadavg_start": loadavg(), "buffered": context.scale.history_buffered}
    database = context.cluster.fresh_database("history")
    result.update(asyncio.run(_history(context, database)))
    context.cluster.drop(database)
    return _stamp(result, started)


PARTS = {"ingest": ingest, "drain": drain, "slow_agent": slow_agent, "timer": timer, "history": history}
