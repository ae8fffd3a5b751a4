"""Turn a run's results into table rows (markdown) and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Row = tuple[str, str, str, str, str, str]  # what, watibot, baseline, ratio, target, met


def _number(value: float | None, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{unit}"


def _ratio(value: float | None, baseline: float | None) -> str:
    if value is None or not baseline:
        return "–"
    return f"{value / baseline:.2f}×"


def _met(ok: bool | None) -> str:
    return "–" if ok is None else ("yes" if ok else "**no**")


def _ingest_rows(results: dict[str, Any]) -> list[Row]:
    table: list[Row] = []
    parts = results["parts"]
    ingest = parts.get("ingest")
    if ingest and "throughput" in ingest:
        for row in ingest["throughput"]:
            workers, ours, bare = row["workers"], row["watibot"], row["bare"]
            target = "≥ 0.60×" if workers == 4 else ""
            table.append((f"Ingest {workers} worker(s), req/s ({ours['tool']})", _number(ours["rps"]),
                          f"bare FastAPI {_number(bare['rps'])}", _ratio(ours["rps"], bare["rps"]), target,
                          _met(ours["rps"] / bare["rps"] >= 0.6 if workers == 4 else None)))
            table.append((f"Ingest {workers} worker(s), latency p50/p95/p99 ms under saturation",
                          f"{ours['p50_ms']:.1f} / {ours['p95_ms']:.1f} / {ours['p99_ms']:.1f}",
                          f"{bare['p50_ms']:.1f} / {bare['p95_ms']:.1f} / {bare['p99_ms']:.1f}",
                          _ratio(ours["p99_ms"], bare["p99_ms"]), "", "–"))
            if "watibot_rate" in row:
                rate, bare_rate = row["watibot_rate"], row["bare_rate"]
                requested = results["scale"]["rate"]
                table.append((f"Ingest {workers} worker(s) at {requested:.0f}/s open loop, p50/p95/p99 ms",
                              f"{rate['p50_ms']} / {rate['p95_ms']} / {rate['p99_ms']} ({rate['errors']} errors)",
                              f"{bare_rate['p50_ms']} / {bare_rate['p95_ms']} / {bare_rate['p99_ms']}",
                              _ratio(rate["p99_ms"], bare_rate["p99_ms"]), "p99 ≤ 25 ms",
                              _met(rate["p99_ms"] is not None and rate["p99_ms"] <= 25 and rate["errors"] == 0)))
            for name, what_if in row.get("what_if", {}).items():
                label = name.replace("_", " ")
                table.append((f"What-if (not in src): ingest {workers} worker(s), {label}: req/s; p99 at "
                              f"{results['scale']['rate']:.0f}/s", f"{_number(what_if['rps'])}; "
                              f"{what_if['rate']['p99_ms']} ms", f"bare FastAPI {_number(bare['rps'])}",
                              _ratio(what_if["rps"], bare["rps"]), "≥ 0.60×; ≤ 25 ms", "–"))
    return table

def _drain_rows(results: dict[str, Any]) -> list[Row]:
    table: list[Row] = []
    parts = results["parts"]
    drain = parts.get("drain")
    if drain and "runs" in drain:
        for run in drain["runs"]:
            ours, workers = run["watibot"], run["workers"]
            if "pgqueuer_wati" not in run:
                table.append((f"Drain {workers} worker(s), bursts/s", _number(ours["bursts_per_second"]),
                              run.get("skipped", "–"), "–", "≥ 1.0×", "–"))
                continue
            wati, noop = run["pgqueuer_wati"], run["pgqueuer_noop"]
            table.append((f"Drain {workers} worker(s), bursts/s ({drain['conversations']} × "
                          f"{drain['messages_per_conversation']} msgs)", _number(ours["bursts_per_second"]),
                          f"pgqueuer + same WATI call, {workers} proc: {_number(wati['jobs_per_second'])}",
                          _ratio(ours["bursts_per_second"], wati["jobs_per_second"]), "≥ 1.0×",
                          _met(ours["bursts_per_second"] >= wati["jobs_per_second"])))
            table.append((f"Drain {workers} worker(s), pgqueuer no-op jobs/s (coordination alone)", "",
                          _number(noop["jobs_per_second"]), "", "", "–"))
            table.append((f"Drain {workers} worker(s), app CPU ms per burst / per job",
                          _number(ours["app_cpu_ms_per_burst"], digits=2),
                          f"WATI job {_number(wati['app_cpu_ms_per_job'], digits=2)}; no-op job "
                          f"{_number(noop['app_cpu_ms_per_job'], digits=2)}",
                          _ratio(ours["app_cpu_ms_per_burst"], wati["app_cpu_ms_per_job"]), "", "–"))
            table.append((f"Drain {workers} worker(s), PostgreSQL CPU ms per burst / per job; statements per burst",
                          f"{_number(ours['db_cpu_ms_per_burst'], digits=2)}; "
                          f"{ours['statements']['statements_per_burst']} statements",
                          f"WATI job {_number(wati['db_cpu_ms_per_job'], digits=2)}; no-op job "
                          f"{_number(noop['db_cpu_ms_per_job'], digits=2)}",
                          _ratio(ours["db_cpu_ms_per_burst"], wati["db_cpu_ms_per_job"]), "", "–"))
        for run in drain["runs"]:
            what_if = run.get("what_if_socket_no_reset")
            if what_if and "pgqueuer_wati" in run:
                table.append((f"What-if (not in src): drain {run['workers']} worker(s), Unix socket + pool without "
                              f"reset: bursts/s; DB CPU ms and statements per burst",
                              f"{_number(what_if['bursts_per_second'])}; {what_if['db_cpu_ms_per_burst']:.2f} ms; "
                              f"{what_if['statements']['statements_per_burst']}",
                              f"pgqueuer + WATI call {_number(run['pgqueuer_wati']['jobs_per_second'])}",
                              _ratio(what_if["bursts_per_second"], run["pgqueuer_wati"]["jobs_per_second"]),
                              "≥ 1.0×", "–"))
    return table

def _slow_agent_rows(results: dict[str, Any]) -> list[Row]:
    table: list[Row] = []
    parts = results["parts"]
    slow = parts.get("slow_agent")
    if slow and "watibot" in slow:
        capacity = slow["workers"] * slow["concurrency_per_worker"]
        table.append((f"Slow agent ({slow['agent_delay_s']:g} s), peak bursts in flight, {slow['workers']} workers",
                      _number(slow["agent_peak_in_flight"]),
                      f"configured {capacity}; seed design 40–80",
                      _ratio(slow["agent_peak_in_flight"], min(capacity, slow["conversations"])), "≥ 1,000",
                      _met(slow["agent_peak_in_flight"] >= 1000 and slow["not_sent"] == 0)))
        table.append((f"Slow agent, bursts/s ({slow['conversations']} bursts, {slow['not_sent']} not sent)",
                      _number(slow["watibot"]["bursts_per_second"]),
                      f"ideal {_number(slow['ideal_bursts_per_second'])}",
                      _ratio(slow["watibot"]["bursts_per_second"], slow["ideal_bursts_per_second"]), "≥ 400",
                      _met((slow["watibot"]["bursts_per_second"] or 0) >= 400 and slow["not_sent"] == 0)))
        for key, label in (("what_if_pool_60", "pool 60/worker"),
                           ("what_if_pool_60_aiohttp_agent", "pool 60/worker + agent via aiohttp")):
            what_if = slow.get(key)
            if what_if:
                table.append((f"What-if (config/extension point): slow agent, {label}: peak in flight; bursts/s; "
                              "not sent", f"{_number(what_if['agent_peak_in_flight'])}; "
                              f"{_number(what_if['watibot']['bursts_per_second'])}; {what_if['not_sent']}",
                              f"ideal {_number(slow['ideal_bursts_per_second'])} bursts/s",
                              _ratio(what_if["watibot"]["bursts_per_second"], slow["ideal_bursts_per_second"]),
                              "≥ 1,000; ≥ 400", "–"))
    return table

def _timer_rows(results: dict[str, Any]) -> list[Row]:
    table: list[Row] = []
    parts = results["parts"]
    timer = parts.get("timer")
    if timer and "idle" in timer:
        for key, limit in (("idle", 100), ("load", 250)):
            late, lag = timer[key]["agent_call_lateness"], timer[key]["claim_lag_db"]
            label = "idle" if key == "idle" else f"under {timer['load']['ingest']['rps']:.0f} webhooks/s"
            table.append((f"Timer lateness {label}, agent call − due_at, p50 / p99 ms",
                          f"{late['p50_ms']} / {late['p99_ms']}",
                          f"claim lag (started_at − due_at) {lag['p50_ms']} / {lag['p99_ms']}", "",
                          f"p99 ≤ {limit} ms", _met(late["p99_ms"] is not None and late["p99_ms"] <= limit)))
    return table

def _history_rows(results: dict[str, Any]) -> list[Row]:
    table: list[Row] = []
    parts = results["parts"]
    history = parts.get("history")
    if history and "levels" in history:
        base = history["levels"][0]
        for level in history["levels"]:
            claim = level["claim"]
            target = "≤ 2.0× at 1 M" if level is history["levels"][-1] else ""
            met = None
            if level is history["levels"][-1] and level["processed_messages"] >= 1_000_000:
                met = claim["p50_ms"] <= 2 * base["claim"]["p50_ms"]
            table.append((f"Claim and begin (batch 50) p50 / p99 ms, {level['processed_messages']:,} processed, "
                          f"{history['buffered']:,} buffered; index {'yes' if level['claim_uses_due_index'] else 'NO'}",
                          f"{claim['p50_ms']} / {claim['p99_ms']}",
                          f"at {base['processed_messages']:,}: {base['claim']['p50_ms']} / {base['claim']['p99_ms']}",
                          _ratio(claim["p50_ms"], base["claim"]["p50_ms"]), target, _met(met)))
        table.append(("Database size per million messages (message + burst, with indexes)",
                      f"{history['mb_per_million_messages']:,.0f} MB", "", "", "", "–"))
    return table


def rows(results: dict[str, Any]) -> list[Row]:
    """One row per figure: watibot's, its same-run baseline, the ratio and the issue's target."""
    table: list[Row] = []
    parts = results["parts"]
    table += _ingest_rows(results)
    table += _drain_rows(results)
    table += _slow_agent_rows(results)
    table += _timer_rows(results)
    table += _history_rows(results)
    table += fleet_rows(parts.get("fleet"))
    memory = results.get("memory")
    if memory and memory.get("load_mb") is not None:
        table.append(("RSS per worker, MB: idle / peak under load (max over workers)",
                      f"{_number(memory['idle_mb'])} / {_number(memory['load_mb'])}",
                      f"bare FastAPI worker {_number(memory['bare_load_mb'])}",
                      _ratio(memory["load_mb"], memory["bare_load_mb"]), "≤ 120 MB",
                      _met(memory["load_mb"] is not None and memory["load_mb"] <= 120)))
    return table


def fleet_rows(fleet: dict[str, Any] | None) -> list[Row]:
    """The fleet part (bench/fleet.py): idle sweepers by N, CPU per burst 2 vs 6 workers, cross-host lateness."""
    table: list[Row] = []
    if not fleet:
        return table
    levels = fleet.get("idle", {}).get("levels", [])
    if levels:
        base = levels[0]
        first = next((level for level in levels if level["workers"]), None)
        for level in levels:
            if not level["workers"] or first is None:
                continue
            table.append((f"Fleet idle: {level['workers']} sweepers in {level['trees']} serve trees: PostgreSQL CPU "
                          "s/s, utime+stime (schedstat); statements/s; transactions/s (ratio: PG CPU per worker, "
                          f"schedstat, vs {first['workers']} workers)",
                          f"{level['pg_cpu_s_per_s']:.4f} ({level['pg_run_time_s_per_s']:.4f}); "
                          f"{_number(level['statements_per_s'])}; {_number(level['transactions_per_s'])}; "
                          f"{level['pg_run_time_ms_per_worker_s']:.2f} ms/s per worker",
                          f"{base['workers']} workers: {base['pg_cpu_s_per_s']:.4f} "
                          f"({base['pg_run_time_s_per_s']:.4f}); "
                          f"{_number(base['statements_per_s'])}; {_number(base['transactions_per_s'])}",
                          _ratio(level["pg_run_time_ms_per_worker_s"], first["pg_run_time_ms_per_worker_s"]),
                          "linear in N", "–"))
    coordination = fleet.get("coordination", {})
    layouts = coordination.get("layouts", [])
    if layouts:
        small = layouts[0]
        for layout in layouts:
            table.append((f"Fleet drain, {layout['workers']} workers on {layout['hosts']} hosts "
                          f"({coordination['conversations']} × {coordination['messages_per_conversation']} msgs): "
                          "PostgreSQL CPU ms per burst; bursts/s; statements per burst",
                          f"{layout['db_cpu_ms_per_burst']:.3f}; {_number(layout['bursts_per_second'])}; "
                          f"{layout['statements_per_burst']}",
                          f"{small['workers']} workers: {small['db_cpu_ms_per_burst']:.3f}; "
                          f"{_number(small['bursts_per_second'])}; {small['statements_per_burst']}",
                          _ratio(layout["db_cpu_ms_per_burst"], small["db_cpu_ms_per_burst"]),
                          "flat (≈ 1.0×)" if layout is not small else "", "–"))
    late = fleet.get("lateness", {})
    if "cross_host" in late:
        cross, same = late["cross_host"], late["same_host"]
        table.append((f"Fleet reply lateness at {late['rate']:g}/s, buffer {late['buffer_seconds']:g} s: webhook on "
                      "ingest-only host, claim on another; WATI reply − (ack + buffer) p50 / p99 ms",
                      f"{cross['lateness']['p50_ms']} / {cross['lateness']['p99_ms']} "
                      f"({cross['replied']}/{cross['acknowledged']} replied)",
                      f"same host: {same['lateness']['p50_ms']} / {same['lateness']['p99_ms']} "
                      f"({same['replied']}/{same['acknowledged']})",
                      _ratio(cross["lateness"]["p99_ms"], same["lateness"]["p99_ms"]), "", "–"))
        table.append(("Fleet reply lateness: claim lag (started_at − due_at) p50 / p99 ms, cross / same host",
                      f"{cross['claim_lag_db']['p50_ms']} / {cross['claim_lag_db']['p99_ms']}",
                      f"{same['claim_lag_db']['p50_ms']} / {same['claim_lag_db']['p99_ms']}",
                      _ratio(cross["claim_lag_db"]["p99_ms"], same["claim_lag_db"]["p99_ms"]), "", "–"))
    return table


def memory_summary(parts: dict[str, Any]) -> dict[str, float | None]:
    """Worst-case RSS per worker across parts: idle after start, peak under ingest, drain and slow-agent load."""
    idle, load, bare = [], [], []
    for row in parts.get("ingest", {}).get("throughput", []):
        idle += row["watibot_rss_idle_mb"]
        load += row["watibot_rss_load_mb"]
        bare += row["bare_rss_load_mb"]
    for run in parts.get("drain", {}).get("runs", []):
        load += run["rss_load_mb"]
    load += parts.get("slow_agent", {}).get("rss_load_mb", [])
    return {"idle_mb": max(idle, default=None), "load_mb": max(load, default=None),
            "bare_load_mb": max(bare, default=None)}


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"### Benchmark {meta['date']} ({'smoke' if meta['smoke'] else 'full'} run, commit {meta['commit']})",
        "",
        f"{meta['cpus']} CPUs shared with other work; load average (1/5/15 min) at start {meta['loadavg_start']}, "
        f"at end {meta['loadavg_end']}. {meta['note']}",
        f"Load: {meta['load_generator']}. PostgreSQL {meta['postgres']} (embedded wheel, fsync on, TCP loopback).",
        "",
        "| figure | watibot | same-run baseline | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(results)]
    for name, part in results["parts"].items():
        if "error" in part:
            lines.append(f"\n**{name} failed:** {part['error']}")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> bool:
    """A 2×3 PNG: ingest, drain, slow agent, timer, claim latency, memory (a third row, or the only one, for the
    fleet part). False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    parts = results["parts"]
    fleet = parts.get("fleet", {})
    only_fleet = set(parts) == {"fleet"}
    figure, axes = plt.subplots(1 if only_fleet else (3 if fleet else 2), 3, squeeze=False,
                                figsize=(15, 4 if only_fleet else (12 if fleet else 8)))
    figure.suptitle(f"watibot benchmarks {results['meta']['date']} (load avg {results['meta']['loadavg_start']})")

    def bars(axis: Any, labels: list[str], series: dict[str, list[float]], title: str, unit: str) -> None:
        width = 0.8 / max(1, len(series))
        for index, (name, values) in enumerate(series.items()):
            axis.bar([x + index * width for x in range(len(labels))], values, width, label=name)
        axis.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels)
        axis.set_title(title)
        axis.set_ylabel(unit)
        axis.legend(fontsize=8)

    ingest = parts.get("ingest", {}).get("throughput", [])
    if ingest:
        bars(axes[0][0], [f"{row['workers']}w" for row in ingest],
             {"watibot": [row["watibot"]["rps"] for row in ingest],
              "bare FastAPI": [row["bare"]["rps"] for row in ingest]},
             "Ingest throughput", "requests/s")
    runs = [run for run in parts.get("drain", {}).get("runs", []) if "pgqueuer_wati" in run]
    if runs:
        bars(axes[0][1], [f"{run['workers']}w" for run in runs], {
            "watibot": [run["watibot"]["bursts_per_second"] for run in runs],
            "pgqueuer + WATI call": [run["pgqueuer_wati"]["jobs_per_second"] for run in runs],
            "pgqueuer no-op": [run["pgqueuer_noop"]["jobs_per_second"] for run in runs],
        }, "Drain (log scale)", "bursts (jobs)/s")
        axes[0][1].set_yscale("log")
    slow = parts.get("slow_agent", {})
    if "watibot" in slow:
        bars(axes[0][2], ["peak in flight", "bursts/s"], {
            "watibot": [slow["agent_peak_in_flight"], slow["watibot"]["bursts_per_second"] or 0],
            "target": [1000, 400],
        }, f"Slow agent ({slow['agent_delay_s']:g} s)", "")
    timer = parts.get("timer", {})
    if "idle" in timer:
        bars(axes[1][0], ["idle p50", "idle p99", "load p50", "load p99"], {
            "agent call − due_at": [timer["idle"]["agent_call_lateness"]["p50_ms"] or 0,
                                    timer["idle"]["agent_call_lateness"]["p99_ms"] or 0,
                                    timer["load"]["agent_call_lateness"]["p50_ms"] or 0,
                                    timer["load"]["agent_call_lateness"]["p99_ms"] or 0],
            "target": [0, 100, 0, 250],
        }, "Timer lateness", "ms")
    levels = parts.get("history", {}).get("levels", [])
    if levels:
        bars(axes[1][1], [f"{level['processed_messages']:,}" for level in levels], {
            "claim p50": [level["claim"]["p50_ms"] for level in levels],
            "claim p99": [level["claim"]["p99_ms"] for level in levels],
        }, "Claim latency vs processed history", "ms")
    memory = results.get("memory", {})
    if memory.get("load_mb"):
        bars(axes[1][2], ["idle", "under load"], {
            "watibot worker": [memory["idle_mb"] or 0, memory["load_mb"] or 0],
            "bare FastAPI worker": [0, memory["bare_load_mb"] or 0],
        }, "RSS per worker (max)", "MB")
        axes[1][2].axhline(120, color="red", linestyle="--", linewidth=1)
    if fleet:
        _fleet_chart(axes[0 if only_fleet else 2], fleet, bars)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def _fleet_chart(axes: Any, fleet: dict[str, Any], bars: Any) -> None:
    levels = fleet.get("idle", {}).get("levels", [])
    if levels:
        axis = axes[0]
        axis.plot([level["workers"] for level in levels], [level["pg_cpu_s_per_s"] for level in levels], "o-")
        axis.set_title("Idle sweepers: PostgreSQL CPU")
        axis.set_xlabel("worker processes polling")
        axis.set_ylabel("CPU s per s")
    layouts = fleet.get("coordination", {}).get("layouts", [])
    if layouts:
        bars(axes[1], [f"{layout['workers']}w / {layout['hosts']} hosts" for layout in layouts], {
            "PostgreSQL CPU ms/burst": [layout["db_cpu_ms_per_burst"] for layout in layouts],
            "app CPU ms/burst": [layout["app_cpu_ms_per_burst"] for layout in layouts],
        }, "Drain: CPU per burst by fleet size", "ms")
    late = fleet.get("lateness", {})
    if "cross_host" in late:
        cross, same = late["cross_host"]["lateness"], late["same_host"]["lateness"]
        bars(axes[2], ["p50", "p99"], {
            "cross host": [cross["p50_ms"] or 0, cross["p99_ms"] or 0],
            "same host": [same["p50_ms"] or 0, same["p99_ms"] or 0],
        }, "Reply lateness after the buffer", "ms")
