"""Held calls at scale, in one process: N calls held at once awaiting review, then all approved.

The runtime is keyturn's own (`server.runtime.running`: ledger on a temp file, policy, broker, gate and the
background tasks a server runs). N `gate.call` tasks of `held_echo` (each with different arguments) wait
for review, then are approved through `broker.decide` in two phases:

    paced         the first `paced` decisions arrive one at a time, each once the previous call has run and a
                  short gap has passed (as reviewers' clicks do): the time from a decision to its tool starting
                  is a wake-up, measured with N calls still held
    back to back  the rest are approved in a tight loop (letting the loop run between two decisions, as separate
                  API requests would): decisions recorded per second, and the time until every call has run.
                  Each woken call writes its own events (the claim, `execution.started`, its end) on the same
                  single ledger connection as the decisions, so here "decision -> tool start" is the time a call
                  waits behind the decisions queued before it (reported as such), not a wake-up

Also measured: memory per held call (RSS delta, after a full collection), and that every call ran exactly once
(tool starts counted; ledger: N `executed` events, chain verifies).
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


PACED_GAP_S = 0.002
"""The quiet time after a paced call has run before the next decision arrives."""


async def run(home: Path, n: int, paced: int = 200) -> dict[str, Any]:
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

        done = {f"held-{i}": anyio.Event() for i in range(n)}

        async def one(i: int) -> None:
            results.append(await kt.gate.call(tool, {"text": f"held-{i}"}, who))
            done[f"held-{i}"].set()

        async def pending() -> list[Any]:
            return await ledger.list_calls(("pending",), limit=10**9)

        async def approve(row: Any) -> None:
            await broker.decide(Verdict(request_id=row.id, reviewer=LOCAL_REVIEWER, verdict="approve",
                                        reason="benchmark", channel="api"))

        gc.collect()
        rss0 = rss_bytes()
        t_hold = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
            # Held: recorded pending in the ledger, and waited on in this process (the broker's public view).
            with anyio.fail_after(600):
                while True:
                    rows = await pending()
                    if len(rows) == n and all(broker.has_waiter(row.id) for row in rows):
                        break
                    await anyio.sleep(0.1)
            hold_s = time.perf_counter() - t_hold
            gc.collect()
            rss1 = rss_bytes()
            paced = min(paced, n // 2)
            decided: dict[str, float] = {}

            # Paced: one decision at a time, the next once this one's call has started and ended.
            for row in rows[:paced]:
                text = str(row.arguments["text"])
                decided[text] = time.perf_counter()
                await approve(row)
                with anyio.fail_after(60):
                    await done[text].wait()
                await anyio.sleep(PACED_GAP_S)

            # Back to back: the rest in a tight loop.
            t_approve = time.perf_counter()
            for row in rows[paced:]:
                decided[str(row.arguments["text"])] = time.perf_counter()
                await approve(row)
                await anyio.lowlevel.checkpoint()  # each decision arrives on its own (an API request, a click)
            decide_s = time.perf_counter() - t_approve
        all_done_s = time.perf_counter() - t_approve

        runs = sum(len(v) for v in bench_tools.STARTS.values())
        once = all(len(bench_tools.STARTS.get(t, ())) == 1 for t in decided)
        executed = sum(e.kind == "executed" for e in await ledger.events(limit=10**9))
        verified = await ledger.verify()
    ok = [r for r in results if not r.is_error]
    latency = [bench_tools.STARTS[t][0] - decided[t] for t in decided if t in bench_tools.STARTS]
    back = len(decided) - paced
    return {
        "held": n,
        "hold_all_s": hold_s,
        "held_per_s": n / hold_s,
        "rss_per_held_call_kib": (rss1 - rss0) / n / 1024,
        "paced": {"decisions": paced, "gap_s": PACED_GAP_S, "decision_to_tool_start": summary(latency[:paced])},
        "back_to_back": back,
        "decide_all_s": decide_s,
        "decisions_per_s": back / decide_s,
        "approve_all_to_all_done_s": all_done_s,
        "all_run_per_s": back / all_done_s,
        "decision_to_tool_start": summary(latency[paced:]),
        "tool_runs": runs,
        "ran_exactly_once": once and runs == n and len(ok) == n,
        "ledger_executed_events": executed,
        "ledger_events": verified.count,
        "chain_verifies": verified.ok,
    }
