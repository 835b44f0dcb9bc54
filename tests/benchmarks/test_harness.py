"""`python benchmarks/run.py --quick` runs every section end to end and prints its two headline lines.

No figure is judged here (tests never fail on wall-clock time): the run must complete, every call it makes must
have succeeded (the harness raises on any unexpected result), and the report must hold every section.
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


def test_the_quick_run_completes_and_reports_every_section(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = dict(re.findall(r"^(overhead_ratio_stdio_median|proxy_ratio_stdio_median)=(\S+)$", done.stdout, re.M))
    assert set(lines) == {"overhead_ratio_stdio_median", "proxy_ratio_stdio_median"}
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in lines.values())
    [result] = tmp_path.glob("*-quick.json")
    data = json.loads(result.read_text())
    assert {"transport", "gate", "held", "ledger", "policy"} <= set(data)
    assert data["held"]["ran_exactly_once"] and data["held"]["chain_verifies"]
    assert data["gate"]["steps"]["guarded call (Gate.call)"]["median_us"] > 0
    assert (tmp_path / result.name.replace(".json", ".md")).read_text().count("###") >= 5
