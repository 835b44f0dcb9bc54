"""`python benchmarks/run.py --quick` runs every section end to end and prints its `name=value` lines.

No figure is judged here (tests never fail on wall-clock time): the run must complete, every call it makes must
have succeeded (the harness raises on any unexpected result), the report must hold every section, and every line
must be printed, well-formed, in its order. Peers are not installed by the test (KEYTURN_BENCH_NO_INSTALL): each
is measured if a run installed it before, else skipped with its reason printed, never silently.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RATIOS = ("overhead_ratio_stdio_median", "overhead_ratio_stdio_vs_sdk_default_median", "overhead_ratio_http_median",
          "overhead_ratio_stdio_32_median", "overhead_ratio_http_32_median", "proxy_ratio_stdio_median",
          "proxy_ratio_http_median")
ORDER = ("guard_us_p50", "guard_us_p99", *RATIOS, "peer_fastmcp", "peer_mcp_airlock", "held_calls",
         "held_memory_kib_per_call", "held_decision_to_tool_start_median_ms", "held_decision_to_tool_start_p99_ms",
         "held_decisions_back_to_back_per_s", "held_back_to_back_all_run_s", "held_ran_exactly_once",
         "ledger_append_per_s", "raw_sqlite_insert_per_commit_per_s", "ledger_append_vs_raw_insert_ratio",
         "verify_events_per_s", "checkpoint_make_median_ms", "verify_with_checkpoints_s",
         "verify_with_checkpoints_events")


def test_the_quick_run_completes_and_reports_every_section(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "KEYTURN_BENCH_NO_INSTALL": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    printed = re.findall(r"^([a-z0-9_]+)=(.+)$", done.stdout, re.M)
    names = [name for name, _ in printed]
    lines = dict(printed)
    # Every figure once, in the documented order (a peer as its ratio or as the reason it was skipped).
    peers = [n for n in names if n.startswith("peer_")]
    for peer in ("fastmcp", "mcp_airlock"):
        assert [n for n in peers if n.startswith(f"peer_{peer}_")] in (
            [f"peer_{peer}_ratio_median"], [f"peer_{peer}_skipped"]), peers
    assert [n for n in names if not n.startswith("peer_")] == [n for n in ORDER if not n.startswith("peer_")]
    assert names.index("proxy_ratio_http_median") < names.index(peers[0]) < names.index("held_calls")
    for name in (*RATIOS, "guard_us_p50", "guard_us_p99", "held_decision_to_tool_start_median_ms",
                 "ledger_append_per_s", "verify_events_per_s", *(p for p in peers if p.endswith("_ratio_median"))):
        assert math.isfinite(float(lines[name])) and float(lines[name]) > 0, (name, lines[name])
    assert all(lines[p].strip() for p in peers if p.endswith("_skipped"))
    assert float(lines["guard_us_p99"]) >= float(lines["guard_us_p50"])
    assert lines["held_ran_exactly_once"] == "yes"
    [result] = tmp_path.glob("*-quick.json")
    data = json.loads(result.read_text())
    assert {"transport", "gate", "held", "ledger", "policy"} <= set(data)
    assert data["held"]["ran_exactly_once"] and data["held"]["chain_verifies"]
    assert data["gate"]["steps"]["guarded call (Gate.call)"]["median_us"] > 0
    assert (tmp_path / result.name.replace(".json", ".md")).read_text().count("###") >= 5
