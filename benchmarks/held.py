"""Held calls at scale, in one process: N calls held at once awaiting review, then all approved.

The runtime is keyturn's own (`server.runtime.running`: ledger on a temp file, policy, broker, gate and the
background tasks a server runs). N `gate.call` tasks of `held_echo` (each with different arguments) wait
for review; the reviewer approves them one after another through `broker.decide`, letting the loop run
between two decisions as separate API requests would. Measured: memory per
held call (RSS delta, after a full collection), time from each decision to its tool starting, and that
every call ran exactly once (tool starts counted; ledger: N `executed` events, chain verifies).
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from benchmarks import bench_tools
from benchmarks.stats import summary
from server.config import load_settings
from server.gate import Identity
from server.models import Verdict
from server.runtime import LOCAL_REVIEWER, running

POLICY = Path(__file__).resolve().parent / "bench-policy.yaml"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def run(home: Path, n: int) -> dict[str, Any]:
    await anyio.Path(home).mkdir(parents=True, exist_ok=True)
    settings = load_settings(None, db=str(home / "held.db"), policy=str(POLICY),
                             tools=[{"module": "benchmarks.bench_tools"}])
    bench_tools.STARTS.clear()
    who = Identity(principal="bench-agent")
    results: list[Any] = []
    async with running(settings) as kt:
        tool = kt.find_tool("held_echo")
        assert tool is not None
        ledger, broker = kt.ledger, kt.broker

        async def one(i: int) -> None:
            results.append(await kt.gate.call(tool, {"text": f"held-{i}"}, who))

        async def pending() -> list[Any]:
            return await ledger.list_calls(("pending",), limit=10**9)

        gc.collect()
        rss0 = rss_bytes()
        t_hold = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
            with anyio.fail_after(600):
                while len(broker._waiters) < n:  # noqa: ASYNC110 (no event says "n calls are waiting")
                    await anyio.sleep(0.05)
            hold_s = time.perf_counter() - t_hold
            gc.collect()
            rss1 = rss_bytes()
            rows = await pending()
            assert len(rows) == n, f"{len(rows)} pending, expected {n}"

            decided: dict[str, float] = {}
            t_approve = time.perf_counter()
            for row in rows:
                text = str(row.arguments["text"])
                decided[text] = time.perf_counter()
                await broker.decide(Verdict(request_id=row.id, reviewer=LOCAL_REVIEWER, verdict="approve",
                                            reason="benchmark", channel="api"))
                await anyio.lowlevel.checkpoint()  # each decision arrives on its own (an API request, a click)
            decide_s = time.perf_counter() - t_approve
        all_done_s = time.perf_counter() - t_approve

        runs = sum(len(v) for v in bench_tools.STARTS.values())
        once = all(len(bench_tools.STARTS.get(t, ())) == 1 for t in decided)
        executed = sum(e.kind == "executed" for e in await ledger.events(limit=10**9))
        verified = await ledger.verify()
    ok = [r for r in results if not r.is_error]
    latency = [bench_tools.STARTS[t][0] - decided[t] for t in decided if t in bench_tools.STARTS]
    return {
        "held": n,
        "hold_all_s": hold_s,
        "held_per_s": n / hold_s,
        "rss_per_held_call_kib": (rss1 - rss0) / n / 1024,
        "decide_all_s": decide_s,
        "decisions_per_s": n / decide_s,
        "approve_all_to_all_done_s": all_done_s,
        "decision_to_tool_start": summary(latency),
        "tool_runs": runs,
        "ran_exactly_once": once and runs == n and len(ok) == n,
        "ledger_executed_events": executed,
        "ledger_events": verified.count,
        "chain_verifies": verified.ok,
    }
