"""The benchmark harness keeps working: `python -m bench --smoke` runs end to end in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.processes


def test_bench_smoke_runs_every_part_and_writes_json_and_markdown(tmp_path: Path) -> None:
    """The smoke run exits 0 and writes a JSON and a markdown table with a figure from every part."""
    pytest.importorskip("aiohttp")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    [results_file] = tmp_path.glob("*-smoke.json")
    results = json.loads(results_file.read_text())
    for name in ("ingest", "drain", "slow_agent", "timer", "history"):
        assert "error" not in results["parts"][name], results["parts"][name]
    assert results["parts"]["ingest"]["throughput"][0]["watibot"]["rps"] > 0
    drained = results["parts"]["drain"]["runs"][0]["watibot"]["bursts"]
    assert drained == results["scale"]["drain_conversations"]
    assert results["parts"]["slow_agent"]["not_sent"] == 0
    assert results["parts"]["history"]["levels"][-1]["claim_uses_due_index"]
    table = (tmp_path / results_file.name.replace(".json", ".md")).read_text()
    assert "| figure | watibot | same-run baseline | ratio | target | met |" in table


def test_metrics_load_script_runs_end_to_end_and_writes_its_figures(tmp_path: Path) -> None:
    """`python -m bench.metrics_load` at a tiny size writes its JSON and table with every figure and check
    (no thresholds here: a 2-second round on a shared machine proves nothing about latency)."""
    pytest.importorskip("aiohttp")
    result = subprocess.run(
        [sys.executable, "-m", "bench.metrics_load", "--bursts", "2000", "--seconds", "2", "--rounds", "1",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-5000:]
    assert "Traceback" not in result.stderr, result.stderr[-5000:]
    [results_file] = tmp_path.glob("*-metrics.json")
    results = json.loads(results_file.read_text())
    assert results["database_reading_ms"]["same_totals"]
    assert results["fill"]["bursts"] == 2000
    (entry,) = results["rounds"]
    assert entry["idle"]["requests"] > 0 and entry["with_scrapers"]["requests"] > 0
    assert entry["scrapers"]["scrapes"] > 0
    assert "| webhook p99 ratio, median over rounds |" in (tmp_path / results_file.name.replace(".json", ".md")).read_text()
