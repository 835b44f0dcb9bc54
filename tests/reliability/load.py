"""A bounded load run against a real `keyturn serve --http`, on loopback only.

    .venv/bin/python -m tests.reliability.load                                  # the CI size (200 sessions)
    .venv/bin/python -m tests.reliability.load --sessions 500 --calls 20000 --time-limit 900

It starts keyturn (probe tool pack, the reliability policy) in a temporary directory, then:

1. warm-up: one round of the same mix and concurrency (imports, caches and allocator arenas settle), then the
   server's RSS is read from /proc/PID/status: the *baseline*;
2. the measured round: `--sessions` concurrent MCP client sessions over streamable HTTP issue `--calls` calls
   between them, a mix of allowed, denied and held calls (`--mix`), while a reviewer task approves or denies
   the held ones through the reviewer HTTP API; no new call starts after `--time-limit` seconds;
3. every session closes; after `--settle` seconds the server's RSS is read again.

Then it checks, from the ledger file and the probe tools' run log: every call has exactly one terminal ledger
event and it is the expected one; exactly the allowed and the approved calls ran, each once; the agents saw
the same outcomes; `keyturn audit verify` passes; the RSS after the run is within `--rss-tolerance-mb` of the
baseline. It prints throughput and latency percentiles (and `--json` the whole report) and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from server.canonical import sha256_hex
from tests.helpers import outcome_of
from tests.reliability.probe_tools import read_runs

ROOT = Path(__file__).resolve().parents[2]
POLICY = Path(__file__).resolve().parent / "policy.yaml"
REVIEWER_TOKEN = "tok-load-reviewer-0001"
KINDS = ("allow", "deny", "hold-a", "hold-d")  # hold-a: the reviewer approves it; hold-d: denies it
EXPECTED = {"allow": "executed", "deny": "denied", "hold-a": "executed", "hold-d": "denied"}
TERMINAL = {"executed", "failed", "denied", "expired", "cancelled", "abandoned"}


@dataclass
class Round:
    """What the agents saw in one round."""

    seen: dict[str, str] = field(default_factory=dict)  # tag -> "ok" | "error: <outcome>"
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    decided: int = 0
    wall_s: float = 0.0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"n": len(ordered), "p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99),
            "max_ms": round(ordered[-1] * 1000, 1), "mean_ms": round(statistics.fmean(ordered) * 1000, 1)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(workdir: Path, progress_s: float) -> tuple[subprocess.Popen[bytes], str]:
    config = workdir / "keyturn.yaml"
    config.write_text(yaml.safe_dump({
        "db": str(workdir / "ledger.db"), "policy": str(POLICY),
        "people": {"alice": {"groups": ["dba"]}, "carol": {"groups": ["dba"]}},
        "reviewers": [{"identity": "api:alice", "person": "alice", "token_sha256": sha256_hex(REVIEWER_TOKEN)}],
        "tools": [{"module": "tests.reliability.probe_tools",
                   "options": {"runs": str(workdir / "runs.log"), "gates": str(workdir / "gates")}}],
        "progress_interval_s": progress_s, "poll_interval_s": 0.1,
    }))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(workdir / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--http", f"127.0.0.1:{port}",
                                 "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError("keyturn serve exited: " + (workdir / "serve.log").read_text())
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=1):
                return proc, base
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError("keyturn serve did not start") from None
            time.sleep(0.1)


def plan(name: str, sessions: int, calls: int, mix: dict[str, float], seed: int) -> list[list[tuple[str, str]]]:
    """Per session, its calls as (kind, unique tag): `calls` in all, kinds drawn with the `mix` weights."""
    rng = random.Random(seed)
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=calls)
    out: list[list[tuple[str, str]]] = [[] for _ in range(sessions)]
    for i, kind in enumerate(kinds):
        out[i % sessions].append((kind, f"{kind}-{name}-{i}"))
    return out


async def run_round(base: str, work: list[list[tuple[str, str]]], time_limit: float) -> Round:
    result = Round()
    started = time.monotonic()
    total = sum(len(w) for w in work)
    remaining = anyio.Event()

    async def session(calls: list[tuple[str, str]]) -> None:
        try:
            async with httpx2.AsyncClient(timeout=httpx2.Timeout(60, read=600)) as http, \
                    Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client:
                for kind, tag in calls:
                    if time.monotonic() - started > time_limit:
                        return
                    t0 = time.monotonic()
                    r = await client.call_tool("probe_run", {"tag": tag})
                    result.latency[kind].append(time.monotonic() - t0)
                    outcome = outcome_of(r).get("outcome", "?")
                    result.seen[tag] = f"error: {outcome}" if r.is_error else "ok"
        except Exception as e:  # a broken session is a finding, not a crash of the generator
            result.errors.append(f"{type(e).__name__}: {e}")
        finally:
            if len(result.seen) + len(result.errors) >= total:
                remaining.set()

    async def reviewer() -> None:
        headers = {"Authorization": f"Bearer {REVIEWER_TOKEN}"}
        done: set[str] = set()
        async with httpx2.AsyncClient(base_url=base, headers=headers, timeout=60) as http:
            while True:
                r = await http.get("/api/requests", params={"state": "pending"})
                r.raise_for_status()
                for req in r.json()["requests"]:
                    if req["id"] in done:
                        continue
                    tag = req["arguments"]["tag"]
                    verdict = "approve" if tag.startswith("hold-a") else "deny"
                    v = await http.post(f"/api/requests/{req['id']}/{verdict}", json={"reason": "load reviewer"})
                    if v.status_code != 200:
                        result.errors.append(f"vote on {tag}: {v.status_code} {v.text[:200]}")
                    done.add(req["id"])
                    result.decided += 1
                await anyio.sleep(0.05)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reviewer)
        async with anyio.create_task_group() as agents:
            for calls in work:
                agents.start_soon(session, calls)
        tg.cancel_scope.cancel()
    result.wall_s = time.monotonic() - started
    return result


def check(workdir: Path, rounds: dict[str, tuple[list[list[tuple[str, str]]], Round]]) -> tuple[list[str], dict[str, Any]]:
    """Every call: one terminal event, the expected one; exactly the allowed and approved calls ran, once."""
    problems: list[str] = []
    with sqlite3.connect(f"file:{workdir / 'ledger.db'}?mode=ro", uri=True) as conn:
        tags = {cid: json.loads(args)["tag"] for cid, args in conn.execute("SELECT id, arguments FROM calls")}
        terminal: dict[str, list[str]] = defaultdict(list)
        for cid, kind in conn.execute("SELECT call_id, kind FROM events WHERE call_id IS NOT NULL ORDER BY seq"):
            if kind in TERMINAL:
                terminal[cid].append(kind)
        event_count = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    by_tag = {tag: cid for cid, tag in tags.items()}
    ran = Counter(r["tag"] for r in read_runs(workdir / "runs.log"))
    outcomes: Counter[str] = Counter()
    for name, (work, seen) in rounds.items():
        for kind, tag in (c for calls in work for c in calls):
            if tag not in seen.seen:
                problems.append(f"{name}: {tag} never completed")
                continue
            cid = by_tag.get(tag)
            kinds = terminal.get(cid or "", [])
            if len(kinds) != 1:
                problems.append(f"{tag}: terminal events {kinds}")
                continue
            outcomes[kinds[0]] += 1
            if kinds[0] != EXPECTED[kind]:
                problems.append(f"{tag}: {kinds[0]}, expected {EXPECTED[kind]}")
            should_run = EXPECTED[kind] == "executed"
            if ran[tag] != (1 if should_run else 0):
                problems.append(f"{tag}: ran {ran[tag]} time(s)")
            agent = seen.seen[tag]
            if (agent == "ok") != should_run:
                problems.append(f"{tag}: the agent saw {agent}")
    strays = set(ran) - set(by_tag)
    if strays:
        problems.append(f"runs with no ledger call: {sorted(strays)[:5]}")
    return problems, {"events": event_count, "outcomes": dict(outcomes)}


def audit_verify(workdir: Path) -> tuple[bool, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "server.cli", "audit", "verify", "--config",
                          str(workdir / "keyturn.yaml")], capture_output=True, text=True, env=env, timeout=300)
    return out.returncode == 0, (out.stdout + out.stderr).strip()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="keyturn-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    mix = {k: float(v) for k, v in (part.split("=") for part in args.mix.split(","))}
    assert set(mix) <= set(KINDS), f"--mix kinds are {KINDS}"
    proc, base = start_server(workdir, args.progress)
    report: dict[str, Any] = {"sessions": args.sessions, "calls": args.calls, "mix": mix, "dir": str(workdir)}
    try:
        warm = plan("warm", args.sessions, args.warmup if args.warmup is not None else args.calls, mix, args.seed)
        warm_round = await run_round(base, warm, args.time_limit)
        await anyio.sleep(args.settle)
        baseline = rss_kb(proc.pid)
        work = plan("main", args.sessions, args.calls, mix, args.seed + 1)
        main_round = await run_round(base, work, args.time_limit)
        peak = hwm_kb(proc.pid)
        await anyio.sleep(args.settle)
        after = rss_kb(proc.pid)
        problems, ledger = check(workdir, {"warm-up": (warm, warm_round), "main": (work, main_round)})
        problems += [f"agent error: {e}" for e in (warm_round.errors + main_round.errors)[:20]]
        ok, verify = audit_verify(workdir)
        if not ok:
            problems.append(f"audit verify failed: {verify}")
        growth_mb = (after - baseline) / 1024
        if growth_mb > args.rss_tolerance_mb:
            problems.append(f"RSS grew {growth_mb:.1f} MB over the baseline (tolerance {args.rss_tolerance_mb} MB)")
        completed = len(main_round.seen)
        report.update({
            "completed": completed,
            "wall_s": round(main_round.wall_s, 2),
            "throughput_calls_per_s": round(completed / main_round.wall_s, 1) if main_round.wall_s else 0,
            "latency": {k: percentiles(v) for k, v in sorted(main_round.latency.items())},
            "held_decided_by_reviewer": main_round.decided,
            "rss_kb": {"baseline": baseline, "after": after, "peak_hwm": peak, "growth_mb": round(growth_mb, 1),
                       "tolerance_mb": args.rss_tolerance_mb},
            "ledger": ledger, "verify": verify, "problems": problems[:50], "problem_count": len(problems),
            "ok": not problems,
        })
        return report
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=200, help="concurrent MCP client sessions (default 200)")
    p.add_argument("--calls", type=int, default=1000, help="calls in the measured round (default 1000)")
    p.add_argument("--warmup", type=int, default=None, help="calls in the warm-up round (default: --calls)")
    p.add_argument("--mix", default="allow=0.5,deny=0.2,hold-a=0.15,hold-d=0.15", help="kind=weight,...")
    p.add_argument("--time-limit", type=float, default=120.0, help="no call starts after this many seconds")
    p.add_argument("--progress", type=float, default=1.0, help="progress notification interval of held calls")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before each RSS reading")
    p.add_argument("--rss-tolerance-mb", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", help="working directory (default: a new temporary one, kept for inspection)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = anyio.run(main_async, args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['completed']} calls from {report['sessions']} sessions in {report['wall_s']} s: "
              f"{report['throughput_calls_per_s']} calls/s")
        for kind, p in report["latency"].items():
            print(f"  {kind:<7} n={p['n']:<5} p50 {p['p50_ms']} ms  p90 {p['p90_ms']} ms  p99 {p['p99_ms']} ms  "
                  f"max {p['max_ms']} ms")
        rss = report["rss_kb"]
        print(f"  server RSS: baseline {rss['baseline'] // 1024} MB, after {rss['after'] // 1024} MB "
              f"(growth {rss['growth_mb']} MB, tolerance {rss['tolerance_mb']} MB), peak {rss['peak_hwm'] // 1024} MB")
        print(f"  ledger: {report['ledger']}; {report['verify']}")
        for problem in report["problems"]:
            print("  PROBLEM:", problem)
        print("OK" if report["ok"] else f"FAILED ({report['problem_count']} problems)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
