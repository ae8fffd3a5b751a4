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
