"""The fleet part: what coordinating through PostgreSQL costs as the number of worker processes and hosts grows.

Three measurements, each next to a baseline from the same run, on the bench's own PostgreSQL:

1. **Idle sweepers.** N worker processes (spread over `watibot serve` trees of `fleet_idle_tree_workers`, each
   tree its own `WATIBOT_HOST_NAME`) polling an empty database. PostgreSQL server CPU seconds per wall second
   (utime + stime of the postmaster and every backend and auxiliary process, psutil) over a fixed window, with
   0 workers as the baseline; statements/s (pg_stat_statements) and transactions/s (pg_stat_database).
2. **CPU per burst by fleet size.** The same drain (M due conversations × K messages, echo agent, fake WATI)
   with 2 workers (2 hosts × 1) and with 6 (3 hosts × 2) on one database per layout: PostgreSQL CPU ms per
   burst, bursts/s, statements and claim calls per burst. The figure is the 6-worker / 2-worker ratio.
3. **Cross-host reply lateness.** Host A (`WATIBOT_SWEEPER=false`) receives the webhooks, hosts B and C (one
   sweeper each) claim; then the same rate sent to host B itself (same-host baseline), same processes, same
   database. Lateness = (fake WATI receives the reply) − (webhook acknowledged + `WATIBOT_BUFFER_SECONDS`), one
   message per customer so each reply maps to one acknowledgement.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.harness import (
    ROOT,
    Child,
    CpuMeter,
    free_port,
    loadavg,
    serve_env,
    sql,
    summary_ms,
    wait_http,
    wait_until,
)
from bench.parts import Context, _burst_rate, _configure_fakes, _fake_stats, _finished, _stamp, insert_due
from watibot.store.claims import CLAIM_DUE, NEXT_DUE


class RunTimeMeter(CpuMeter):
    """Like `CpuMeter`, from /proc/<pid>/schedstat (time on a CPU in ns) instead of utime + stime (10 ms ticks).

    Idle backends use a few ms of CPU per second between them: ticks truncated per process are coarse there.
    """

    def _read(self) -> dict[int, float]:
        seen = {}
        for process in self.processes():
            with contextlib.suppress(OSError, ValueError, psutil.Error):
                seen[process.pid] = int(Path(f"/proc/{process.pid}/schedstat").read_text().split()[0]) / 1e9
        return seen


@dataclass
class Tree:
    """One `watibot serve --workers N` process tree standing for one host."""

    host: str
    workers: int
    child: Child
    url: str


def _start_trees(context: Context, database: str, specs: list[tuple[str, int, dict[str, str]]],
                 label: str) -> list[Tree]:
    """Start every tree at once (startup is CPU-bound: overlap it), then wait for each to be ready."""
    trees = []
    for host, workers, extra in specs:
        port = free_port()
        env = serve_env(database, WATIBOT_HOST_NAME=host, **extra)
        child = context.children.start(f"serve-{label}-{host}", [
            sys.executable, "-m", "watibot", "serve", "--workers", str(workers), "--port", str(port), "--no-migrate",
        ], env)
        trees.append(Tree(host, workers, child, f"http://127.0.0.1:{port}"))
    for tree in trees:
        wait_http(f"{tree.url}/readyz", tree.child, timeout=180)
        wait_until(lambda tree=tree: len(tree.child.workers()) >= tree.workers, 120, what="uvicorn workers")
    return trees


def _stop_trees(trees: list[Tree]) -> None:
    for tree in trees:  # SIGTERM to all first: they shut down in parallel
        if tree.child.alive():
            tree.child.process.terminate()
    for tree in trees:
        tree.child.stop()


def _workers(trees: list[Tree]) -> list[psutil.Process]:
    return [worker for tree in trees for worker in tree.child.workers()]


def _backends(database: str) -> int:
    return int(sql(database, """SELECT count(*) FROM pg_stat_activity
                                WHERE datname = current_database() AND application_name = 'watibot'""")[0][0])


def _transactions(database: str) -> int:
    return int(sql(database, """SELECT xact_commit + xact_rollback FROM pg_stat_database
                                WHERE datname = current_database()""")[0][0])


def _normal(query: str) -> str:
    return re.sub(r"\s+", " ", query).strip()


KNOWN = {_normal(CLAIM_DUE): "CLAIM_DUE", _normal(NEXT_DUE): "NEXT_DUE"}
BENCH_STATEMENTS = ["%pg_stat%", "%generate_series%", "UPDATE watibot.conversation SET due_at = now() WHERE customer%",
                    "%finished_at IS NOT NULL AND customer LIKE%"]  # the bench's own, left out of the counts


def _statement_counts(database: str) -> dict[str, Any]:
    """Calls and rows per statement in this database since the last reset (the bench's own reads and inserts left
    out, but for the COMMIT of its insert)."""
    rows = sql(database, """
        SELECT calls, rows, total_exec_time, query
        FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
        WHERE d.datname = current_database() AND NOT query ILIKE ANY (%s)
        ORDER BY calls DESC""", BENCH_STATEMENTS)
    named = {}
    for calls, returned, total_ms, query in rows:
        name = KNOWN.get(_normal(query), _normal(query)[:80])
        entry = named.setdefault(name, {"calls": 0, "rows": 0, "total_ms": 0.0})
        entry["calls"] += calls
        entry["rows"] += returned
        entry["total_ms"] += total_ms
    return {"calls": sum(row[0] for row in rows), "exec_ms": round(sum(row[2] for row in rows), 1),
            "by_statement": dict(sorted(named.items(), key=lambda item: -item[1]["calls"])[:8])}


# -- 1. idle sweepers ---------------------------------------------------------------------------------------------

def _idle_window(context: Context, database: str, trees: list[Tree], seconds: float) -> dict[str, Any]:
    sql(database, "SELECT pg_stat_statements_reset()")
    transactions = _transactions(database)
    backends = _backends(database)
    server, app = CpuMeter(context.cluster.server_processes), CpuMeter(lambda: _workers(trees))
    precise = RunTimeMeter(context.cluster.server_processes)
    began = time.monotonic()
    server.start()
    precise.start()
    app.start()
    time.sleep(seconds)
    server_seconds, precise_seconds, app_seconds = server.stop(), precise.stop(), app.stop()
    wall = time.monotonic() - began
    statements = _statement_counts(database)
    transactions = _transactions(database) - transactions  # includes the bench's own few reads: see 0 workers
    per_second = {name: round(entry["calls"] / wall, 1) for name, entry in statements["by_statement"].items()}
    return {
        "workers": sum(tree.workers for tree in trees), "trees": len(trees), "window_s": round(wall, 2),
        "pg_cpu_s_per_s": round(server_seconds / wall, 5), "pg_run_time_s_per_s": round(precise_seconds / wall, 5),
        "workers_cpu_s_per_s": round(app_seconds / wall, 5),
        "statements_per_s": round(statements["calls"] / wall, 1), "transactions_per_s": round(transactions / wall, 1),
        "statements_per_s_by_statement": per_second, "watibot_backends": [backends, _backends(database)],
        "loadavg": loadavg(),
    }


def idle(context: Context) -> dict[str, Any]:
    scale = context.scale
    database = context.cluster.fresh_database("fleetidle")
    trees: list[Tree] = []
    levels = []
    try:
        for target in scale.fleet_idle_workers:
            missing = target - sum(tree.workers for tree in trees)
            specs = []
            while missing > 0:
                size = min(scale.fleet_idle_tree_workers, missing)
                specs.append((f"idle-h{len(trees) + len(specs) + 1}", size, {}))
                missing -= size
            if specs:
                trees += _start_trees(context, database, specs, "idle")
                wait_until(lambda target=target: _backends(database) >= target, 120, 0.5, "idle workers connected")
            time.sleep(scale.fleet_idle_settle)  # startup done: passkey, first schema check, pool warm
            levels.append(_idle_window(context, database, trees, scale.fleet_idle_seconds))
            print(f"bench: fleet idle {target} workers: {levels[-1]['pg_cpu_s_per_s']} PostgreSQL CPU s/s "
                  f"({levels[-1]['pg_run_time_s_per_s']} by schedstat), "
                  f"{levels[-1]['statements_per_s']} statements/s", file=sys.stderr, flush=True)
        errors = sum(tree.child.count_in_log("ERROR") for tree in trees)
    finally:
        _stop_trees(trees)
        context.cluster.drop(database)
    base = levels[0]
    for level in levels:
        if level["workers"]:
            level["pg_cpu_ms_per_worker_s"] = round(
                1000 * (level["pg_cpu_s_per_s"] - base["pg_cpu_s_per_s"]) / level["workers"], 3)
            level["pg_run_time_ms_per_worker_s"] = round(
                1000 * (level["pg_run_time_s_per_s"] - base["pg_run_time_s_per_s"]) / level["workers"], 3)
            level["statements_per_worker_s"] = round(level["statements_per_s"] / level["workers"], 2)
    return {"levels": levels, "tree_workers": scale.fleet_idle_tree_workers, "errors_logged": errors,
            "poll_seconds": 1.0}


# -- 2. CPU per burst, 2 vs 6 workers -----------------------------------------------------------------------------

def _drain_run(context: Context, database: str, trees: list[Tree], prefix: str) -> dict[str, Any]:
    scale = context.scale
    # Inserted not due (due_at NULL), then made due by one UPDATE once the meters run: the figure is the drain's,
    # not the insert's.
    insert_due(database, prefix, scale.fleet_conversations, scale.fleet_messages, "NULL")
    sql(database, "SELECT pg_stat_statements_reset()")
    server, app = CpuMeter(context.cluster.server_processes), CpuMeter(lambda: _workers(trees))
    server.start()
    app.start()
    sql(database, "UPDATE watibot.conversation SET due_at = now() WHERE customer LIKE %s", prefix + "%")
    wait_until(lambda: _finished(database, prefix) >= scale.fleet_conversations, 240, 0.2, "fleet drain")
    server_seconds, app_seconds = server.stop(), app.stop()
    run = _burst_rate(database, prefix)
    bursts = run["bursts"]
    statements = _statement_counts(database)
    claim = statements["by_statement"].get("CLAIM_DUE", {"calls": 0, "rows": 0})
    run.update({
        "db_cpu_ms_per_burst": round(1000 * server_seconds / bursts, 3),
        "app_cpu_ms_per_burst": round(1000 * app_seconds / bursts, 3),
        "statements_per_burst": round(statements["calls"] / bursts, 2),
        "db_exec_ms_per_burst": round(statements["exec_ms"] / bursts, 3),
        "claim_calls_per_burst": round(claim["calls"] / bursts, 3),
        "claimed_per_claim_call": round(claim["rows"] / claim["calls"], 2) if claim["calls"] else None,
        "hosts_used": int(sql(database, """SELECT count(DISTINCT split_part(claimed_by, ':', 1)) FROM watibot.burst
                                           WHERE customer LIKE %s""", prefix + "%")[0][0]),
        "statements": statements["by_statement"],
    })
    return run


def _abba(count: int, repeats: int) -> list[int]:
    """Indices 0..count-1 forwards, then backwards, … `repeats` times: drift in the machine's load cancels out."""
    order: list[int] = []
    for repeat in range(repeats):
        order += list(range(count)) if repeat % 2 == 0 else list(reversed(range(count)))
    return order


def coordination(context: Context) -> dict[str, Any]:
    scale = context.scale
    _configure_fakes(context, 0.0)
    env = {"WATIBOT_WATI_API_URL": f"{context.fakes_url}/1234", "WATIBOT_CONCURRENCY": "100",
           "WATIBOT_CLAIM_BATCH": "100"}
    runs: dict[int, list[dict[str, Any]]] = {index: [] for index in range(len(scale.fleet_layouts))}
    errors = dict.fromkeys(runs, 0)
    for number, index in enumerate(_abba(len(scale.fleet_layouts), scale.fleet_repeats)):
        layout = scale.fleet_layouts[index]
        workers = sum(layout)
        database = context.cluster.fresh_database("fleetdrain")
        trees = _start_trees(context, database, [(f"host-{chr(97 + host)}", size, env)
                                                 for host, size in enumerate(layout)], f"drain-{workers}w-{number}")
        try:
            wait_until(lambda database=database, workers=workers: _backends(database) >= workers, 60, 0.5,
                       "workers connected")
            time.sleep(1.0)
            run = _drain_run(context, database, trees, f"f{workers}w{number}_")
            run["order"] = number
            runs[index].append(run)
            errors[index] += sum(tree.child.count_in_log("ERROR") for tree in trees)
        finally:
            _stop_trees(trees)
            context.cluster.drop(database)
        print(f"bench: fleet drain {workers} workers: {run['db_cpu_ms_per_burst']} ms PostgreSQL CPU per burst, "
              f"{run['bursts_per_second']} bursts/s", file=sys.stderr, flush=True)
    layouts = []
    for index, layout in enumerate(scale.fleet_layouts):
        mine = runs[index]
        layouts.append({
            "workers": sum(layout), "hosts": len(layout), "workers_per_host": layout, "runs": mine,
            "db_cpu_ms_per_burst": round(statistics.median(run["db_cpu_ms_per_burst"] for run in mine), 3),
            "app_cpu_ms_per_burst": round(statistics.median(run["app_cpu_ms_per_burst"] for run in mine), 3),
            "bursts_per_second": round(statistics.median(run["bursts_per_second"] or 0 for run in mine), 1),
            "statements_per_burst": round(statistics.median(run["statements_per_burst"] for run in mine), 2),
            "errors_logged": errors[index],
        })
    small, large = layouts[0], layouts[-1]
    return {"conversations": scale.fleet_conversations, "messages_per_conversation": scale.fleet_messages,
            "concurrency": 100, "claim_batch": 100, "order": "ABBA… (trees restarted for every run)",
            "layouts": layouts,
            "db_cpu_ratio": round(large["db_cpu_ms_per_burst"] / small["db_cpu_ms_per_burst"], 3),
            "bursts_per_second_ratio": round(large["bursts_per_second"] / small["bursts_per_second"], 3)
            if small["bursts_per_second"] else None}


# -- 3. reply lateness, webhook on one host and claim on another --------------------------------------------------

def _phase(context: Context, database: str, tree: Tree, name: str, offset: int,
           rate: float | None = None, seconds: float | None = None) -> dict[str, Any]:
    scale = context.scale
    rate, seconds = rate or scale.fleet_rate, seconds or scale.fleet_rate_seconds
    _configure_fakes(context, 0.0)  # also forgets earlier WATI calls
    record = context.work_dir / f"fleet-ack-{name}.json"
    total = int(rate * seconds)
    load = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--url", tree.url, "--rate", str(rate),
         "--duration", str(seconds), "--connections", "64", "--customers", str(total + 1),
         "--customer-offset", str(offset), "--record", str(record)],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=seconds + 60)
    ingest = json.loads(load.stdout.strip().splitlines()[-1])
    acknowledged = dict(json.loads(record.read_text()))

    def replies() -> dict[str, float]:
        first: dict[str, float] = {}
        for wa_id, at in _fake_stats(context, calls=True)["wati_calls"]:
            first.setdefault(wa_id, at)
        return first

    with contextlib.suppress(TimeoutError):
        wait_until(lambda: len(acknowledged.keys() & replies().keys()) >= len(acknowledged), 60, 0.25, "replies")
    sent = replies()
    lateness = [sent[wa_id] - (at + scale.fleet_buffer_seconds) for wa_id, at in acknowledged.items() if wa_id in sent]
    rows = sql(database, """
        SELECT c.wa_id, EXTRACT(EPOCH FROM b.started_at - b.due_at)::float8, split_part(b.claimed_by, ':', 1),
               EXTRACT(EPOCH FROM b.due_at)::float8
        FROM watibot.burst AS b JOIN watibot.conversation AS c USING (channel, customer)""")
    mine = [(lag, host) for wa_id, lag, host, _ in rows if wa_id in acknowledged]
    first_ack = min(acknowledged.values(), default=0.0)
    worst = sorted(((lag, host, due - first_ack) for wa_id, lag, host, due in rows if wa_id in acknowledged),
                   reverse=True)[:10]
    hosts: dict[str, int] = {}
    for _, host in mine:
        hosts[host] = hosts.get(host, 0) + 1
    lags = [lag for lag, _ in mine]
    return {"webhooks_to": tree.host, "ingest": ingest, "acknowledged": len(acknowledged),
            "replied": len(lateness), "lateness": summary_ms(lateness), "claim_lag_db": summary_ms(lags),
            "claimed_by_host": hosts, "early": sum(1 for value in lateness if value < 0),
            "worst_claim_lags": [{"lag_ms": round(lag * 1000, 1), "host": host, "due_s_after_first_ack": round(at, 2)}
                                 for lag, host, at in worst],
            "_lateness": lateness, "_claim_lag": lags}


def lateness(context: Context) -> dict[str, Any]:
    scale = context.scale
    env = {"WATIBOT_WATI_API_URL": f"{context.fakes_url}/1234",
           "WATIBOT_BUFFER_SECONDS": f"{scale.fleet_buffer_seconds:g}"}
    database = context.cluster.fresh_database("fleetlate")
    trees = _start_trees(context, database, [("host-a", 1, env | {"WATIBOT_SWEEPER": "false"}),
                                             ("host-b", 1, env), ("host-c", 1, env)], "late")
    cases = [("cross_host", trees[0]), ("same_host", trees[1])]
    phases: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in cases}
    try:
        # Unmeasured warm-up through every host (first bursts pay for connections, prepared statements, type
        # introspection): otherwise the first measured phase carries it.
        for number, tree in enumerate(trees):
            _phase(context, database, tree, f"warm-up-{tree.host}", 5_000_000 + 1_000_000 * number, 20.0, 1.0)
        for number, index in enumerate(_abba(len(cases), scale.fleet_repeats)):
            name, tree = cases[index]
            phases[name].append(_phase(context, database, tree, f"{name}-{number}", 1_000_000 * number))
            phases[name][-1]["order"] = number
        errors = sum(tree.child.count_in_log("ERROR") for tree in trees)
    finally:
        _stop_trees(trees)
        context.cluster.drop(database)
    result: dict[str, Any] = {}
    for name, runs in phases.items():
        late = [value for run in runs for value in run.pop("_lateness")]
        lags = [value for run in runs for value in run.pop("_claim_lag")]
        hosts: dict[str, int] = {}
        for run in runs:
            for host, count in run["claimed_by_host"].items():
                hosts[host] = hosts.get(host, 0) + count
        result[name] = {"webhooks_to": runs[0]["webhooks_to"], "acknowledged": sum(r["acknowledged"] for r in runs),
                        "replied": len(late), "lateness": summary_ms(late), "claim_lag_db": summary_ms(lags),
                        "claimed_by_host": hosts, "early": sum(1 for value in late if value < 0), "runs": runs}
    result.update({"rate": scale.fleet_rate, "seconds": scale.fleet_rate_seconds,
                   "buffer_seconds": scale.fleet_buffer_seconds, "poll_seconds": 1.0, "errors_logged": errors,
                   "order": "ABBA… (cross, same, same, cross), same processes and database",
                   "layout": "host-a: 1 worker, sweeper off (ingest); host-b, host-c: 1 worker each, sweeper on"})
    return result


def fleet(context: Context) -> dict[str, Any]:
    """Idle sweeper cost by N, PostgreSQL CPU per burst with 2 vs 6 workers on 3 hosts, cross-host lateness."""
    started = time.monotonic()
    result: dict[str, Any] = {"loadavg_start": loadavg()}
    for name, measure in (("idle", idle), ("coordination", coordination), ("lateness", lateness)):
        others = psutil.cpu_percent(interval=0.3 if context.scale.smoke else 2.0)
        try:
            result[name] = measure(context)
        except Exception as error:  # one failed measurement must not lose the others
            traceback.print_exc()
            result[name] = {"error": f"{type(error).__name__}: {error}"}
            result["error"] = f"{name}: {result[name]['error']}"
        result[name]["cpu_busy_before_percent"] = others
    return _stamp(result, started)
