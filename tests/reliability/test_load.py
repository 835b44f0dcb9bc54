"""The bounded load run (tests/reliability/load.py) at CI size: 200 concurrent MCP sessions over streamable HTTP,
1000 measured calls (after a warm-up round of 1000), allowed / denied / held, a reviewer deciding the held ones
through the HTTP API. Every call has exactly one terminal event, only allowed and approved calls ran (once each),
the chain verifies, and the server's RSS is back within 16 MB of its post-warm-up baseline. Nothing here asserts
on wall-clock time: the figures are printed (`pytest -s`) and written to load-report.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, Home


@pytest.mark.slow
def test_200_sessions_of_mixed_calls_each_end_once_and_the_server_returns_to_its_memory_baseline(
        home: Home, tmp_path: Path) -> None:
    workdir = tmp_path / "load"
    out = subprocess.run(
        [sys.executable, "-m", "tests.reliability.load", "--sessions", "200", "--calls", "1000",
         "--time-limit", "150", "--dir", str(workdir), "--json"],
        capture_output=True, text=True, env=home.env(), cwd=ROOT, timeout=600)
    assert out.returncode in (0, 1), out.stderr[-3000:]
    report = json.loads(out.stdout)
    (tmp_path / "load-report.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['completed']} calls, {report['sessions']} sessions, {report['wall_s']} s, "
          f"{report['throughput_calls_per_s']} calls/s")
    for kind, p in report["latency"].items():
        print(f"  {kind:<7} p50 {p['p50_ms']} ms  p90 {p['p90_ms']} ms  p99 {p['p99_ms']} ms  max {p['max_ms']} ms")
    print(f"  RSS {report['rss_kb']}")
    assert report["problems"] == [], report["problems"]
    assert report["completed"] == 1000
    assert report["ledger"]["outcomes"]["executed"] + report["ledger"]["outcomes"]["denied"] == 2000
    assert "chain intact" in report["verify"]
    assert report["rss_kb"]["growth_mb"] <= report["rss_kb"]["tolerance_mb"]
    assert report["ok"]
