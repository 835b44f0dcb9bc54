"""keyturn's benchmarks: what the guard costs, measured side by side with an unguarded MCP server in the same run.

    python benchmarks/run.py            # everything (several minutes)
    python benchmarks/run.py --quick    # a reduced version, under a minute
    python benchmarks/run.py --only transport,ledger

Writes benchmarks/results/<stamp>.json and .md (the Markdown tables) and ends with one `name=value` line per
figure (`benchmarks/report.py: figures`; what each compares is in docs/performance.md). Sections:

    transport  allow-path overhead over stdio and streamable HTTP, sequential and 32 concurrent (transport.py):
               keyturn against the plain server on the same transport (and on the SDK's default stdio), and
               `keyturn proxy` against the peer proxies (peers.py), all in front of the same plain server
    gate       the guard's own cost in-process, step by step, against the tool run bare (gate_bench.py)
    held       N calls held at once awaiting review, then all approved (held.py)
    ledger     events appended per second and verify speed, against raw SQLite (ledger_bench.py)
    checkpoints  a signed checkpoint's cost, and verify with checkpoints and the tables replayed (checkpoint_bench.py)
    policy     decision latency with a 1,000-rule policy (policy_bench.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from benchmarks import checkpoint_bench, gate_bench, held, ledger_bench, policy_bench, transport  # noqa: E402
from benchmarks.report import figures, markdown  # noqa: E402
from benchmarks.stats import percentile  # noqa: E402

SECTIONS = ("transport", "gate", "held", "ledger", "checkpoints", "policy")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version, "mcp": version("mcp"), "load_at_start": os.getloadavg(),
    }


def policy_section(quick: bool) -> dict[str, Any]:
    raw = policy_bench.run(rules=1000, calls=300 if quick else 5000)
    out: dict[str, Any] = {"rules": raw["rules"], "compile_ms": raw["compile_ms"], "scenarios": {}}
    for tool, s in raw["scenarios"].items():
        row: dict[str, Any] = {"candidates": s["candidates"], "outcome": s["outcome"]}
        for name in ("extract_facts", "decide", "extract_facts+decide"):
            samples = sorted(s[name])
            row[name] = {"median_us": samples[len(samples) // 2], "p99_us": percentile(samples, 99)}
        out["scenarios"][tool] = row
    return out


async def run_all(sections: tuple[str, ...], quick: bool, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"quick": quick, "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for name in sections:
        t = time.perf_counter()
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        if name == "transport":
            results[name] = await transport.run(work / "transport", quick=quick)
        elif name == "gate":
            results[name] = await gate_bench.run(work / "gate", 2000 if quick else 20_000)
        elif name == "held":
            results[name] = await held.run(work / "held", 500 if quick else 2000, paced=100 if quick else 200)
        elif name == "ledger":
            results[name] = await ledger_bench.run(
                work / "ledger", appends=2000 if quick else 20_000, verify_events=50_000 if quick else 1_000_000)
        elif name == "checkpoints":
            results[name] = await checkpoint_bench.run(work / "checkpoints",
                                                       verify_events=50_000 if quick else 1_000_000)
        elif name == "policy":
            results[name] = policy_section(quick)
        results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t, 1)
        print(f"[{name}] {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    results["machine"]["load_at_end"] = os.getloadavg()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="keyturn's benchmarks")
    parser.add_argument("--quick", action="store_true", help="a reduced run, under a minute")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--label", default="", help="added to the output file names")
    opts = parser.parse_args()
    sections = tuple(s.strip() for s in opts.only.split(",") if s.strip())
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections: {sorted(unknown)}")

    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="keyturn-bench-") as work:
        results = anyio.run(run_all, sections, opts.quick, Path(work))
    results["total_seconds"] = round(time.perf_counter() - t, 1)
    lines = figures(results)
    results["figures"] = dict(lines)

    opts.out.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if opts.quick else "") + (f"-{opts.label}" if opts.label else "")
    (opts.out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    table = markdown(results)
    (opts.out / f"{stem}.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"results: {opts.out / stem}.json, .md ({results['total_seconds']} s)")
    for name, value in lines:
        print(f"{name}={value}")


if __name__ == "__main__":
    main()
