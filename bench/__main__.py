"""`python -m bench [--smoke] [--parts ingest,drain,...] [--out DIR]` — run the benchmarks, write and print results.

Writes `<out>/<date>.json`, `<out>/<date>.md` and `<out>/<date>.png` (default out: bench/results/), and prints
the markdown table; a run of some parts only is named `<date>-<part>-…` so it never replaces a full run's files.
Everything runs on its own embedded PostgreSQL 18 (fsync on) in a temporary directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from bench import fleet, report
from bench import parts as benchmark_parts
from bench.harness import ROOT, Children, Cluster, fake_outside, loadavg, wrk_available

PRELIMINARY_LOAD = 1.0  # 1-minute load average of the 2-core box when the run starts
PRELIMINARY_BUSY = 25.0  # % of all CPUs used by other work in the seconds before a part starts
PARTS = {**benchmark_parts.PARTS, "fleet": fleet.fleet}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _run_parts(results: dict[str, Any], wanted: list[str], scale: benchmark_parts.Scale, out: Path, stamp: str,
               smoke: bool) -> None:
    """Start the cluster and the fakes, run each wanted part into `results["parts"]`, stop everything."""
    with tempfile.TemporaryDirectory(prefix="watibot-bench-") as temporary:
        work = Path(temporary)
        (work / "logs").mkdir()
        cluster = Cluster(work / "pg", durable=True)
        children = Children(work / "logs")
        began = time.monotonic()
        try:
            cluster.start()
            results["meta"]["postgres"] = benchmark_parts.sql(cluster.url(), "SHOW server_version")[0][0]
            with fake_outside(children) as fakes_url:
                context = benchmark_parts.Context(cluster, children, scale, fakes_url, work)
                for name in wanted:
                    # The load average still holds our previous part; the CPU others use right now, while all
                    # of ours idles, says whether the box is shared.
                    others = psutil.cpu_percent(interval=1.0 if smoke else 3.0)
                    print(f"bench: {name} … (load average {loadavg()}, CPU busy with other work {others:.0f} %)",
                          file=sys.stderr, flush=True)
                    try:
                        results["parts"][name] = PARTS[name](context)
                    except Exception as error:  # one failed part must not lose the others' figures
                        traceback.print_exc()
                        results["parts"][name] = {"error": f"{type(error).__name__}: {error}",
                                                  "loadavg_start": loadavg()}
                    results["parts"][name]["cpu_busy_before_percent"] = others
                    print(f"bench: {name} done in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
                results["profiles"] = context.profiles
                if context.profiles:  # raw collapsed stacks (flamegraph.pl / speedscope input), next to results
                    for raw in work.glob("profile-*.txt"):
                        (out / f"{stamp}-{raw.name}").write_text(raw.read_text())
        finally:
            children.stop_all()
            cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: runs in well under a minute (CI)")
    parser.add_argument("--parts", "--only", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results directory")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy profiles in a full run")
    parser.add_argument("--note", default="", help="a sentence for the results (e.g. what else ran on the machine)")
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = set(wanted) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    scale = benchmark_parts.Scale.small() if args.smoke else benchmark_parts.Scale(smoke=False)
    if args.no_profile:
        scale.profile = False
    args.out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    subset = "" if set(wanted) == set(PARTS) else "-" + "-".join(wanted)
    stamp = now.strftime("%Y-%m-%d") + subset + ("-smoke" if args.smoke else "")

    results: dict[str, Any] = {
        "meta": {
            "date": now.strftime("%Y-%m-%d %H:%M UTC"), "smoke": args.smoke, "commit": _commit(),
            "cpus": os.cpu_count(), "loadavg_start": loadavg(), "python": sys.version.split()[0],
            "load_generator": ("wrk 4.1 (Debian) -t2 -c64 for saturation; an aiohttp asyncio client in its own "
                               "process (bench/loadgen.py) for fixed rates") if wrk_available() else
                              "an aiohttp asyncio client in its own process (bench/loadgen.py); wrk not installed",
        },
        "scale": scale.__dict__,
        "parts": {},
    }
    _run_parts(results, wanted, scale, args.out, stamp, args.smoke)
    results["memory"] = report.memory_summary(results["parts"])
    results["meta"]["loadavg_end"] = loadavg()
    others = [part.get("cpu_busy_before_percent", 0.0) for part in results["parts"].values()]
    results["meta"]["cpu_busy_with_other_work_percent"] = others
    busy = results["meta"]["loadavg_start"][0] > PRELIMINARY_LOAD or max(others, default=0.0) > PRELIMINARY_BUSY
    results["meta"]["preliminary"] = busy
    results["meta"]["note"] = (
        f"CPU busy with other work just before each part: {', '.join(f'{value:.0f} %' for value in others)}. "
        + ("**Preliminary: other work was using the machine (load > 1.0 at start, or > 25 % CPU before a "
           "part).**" if busy else "The machine was otherwise quiet.")
        + (f" {args.note}" if args.note else ""))
    table = report.markdown(results)
    (args.out / f"{stamp}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (args.out / f"{stamp}.md").write_text(table)
    profiles = results.get("profiles") or {}
    if profiles:
        (args.out / f"{stamp}-profiles.txt").write_text(
            "\n\n".join(f"== {name} ==\n{text}" for name, text in profiles.items()) + "\n")
    report.chart(results, args.out / f"{stamp}.png")
    print(table)
    failed = [name for name, part in results["parts"].items() if "error" in part]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
