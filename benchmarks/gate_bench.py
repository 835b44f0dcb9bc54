"""The guard's own cost, in one process and without any transport: one allowed call through `Gate.call`, and
each of its steps timed alone, next to the tool run bare (no guard).

The runtime is keyturn's own (`server.runtime.running`: ledger on a temp file with the shipped durability, the
benchmark policy, the background tasks a server runs). The steps are what `Gate.call` does for an allowed call:
validate and hash the arguments, classify them into facts, redact, decide, record the call before it runs
(one transaction), run the tool, and record its outcome before returning (a second transaction).
"""

from __future__ import annotations

import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from server.canonical import args_hash
from server.classify import Redaction, extract_facts
from server.config import load_settings
from server.gate import Identity, result_digest
from server.models import ToolCall
from server.records import open_call
from server.runtime import running

POLICY = Path(__file__).resolve().parent / "bench-policy.yaml"
ARGS = {"text": "hello from the benchmark"}


async def run(home: Path, calls: int) -> dict[str, Any]:
    await anyio.Path(home).mkdir(parents=True, exist_ok=True)
    settings = load_settings(None, db=str(home / "gate.db"), policy=str(POLICY),
                             tools=[{"module": "benchmarks.bench_tools"}])
    who = Identity(principal="bench-agent")
    steps: dict[str, list[float]] = {}

    def timed(name: str, t: float) -> None:
        steps.setdefault(name, []).append(time.perf_counter() - t)

    async with running(settings) as kt:
        tool = kt.find_tool("echo")
        assert tool is not None
        gate = kt.gate
        warmup = max(100, calls // 10)
        for i in range(warmup + calls):
            keep = i >= warmup
            t = time.perf_counter()
            result = await gate.call(tool, dict(ARGS), who)
            if keep:
                timed("guarded call (Gate.call)", t)
            if result.is_error:
                raise RuntimeError(f"unexpected result: {result}")
            t = time.perf_counter()
            await tool.run(dict(ARGS))
            if keep:
                timed("the tool alone (no guard)", t)
            # The same steps one by one.
            t = time.perf_counter()
            arguments = tool.validate(dict(ARGS))
            digest = args_hash(arguments)
            call = ToolCall.model_construct(call_id=uuid.uuid4().hex, tool=tool.name, arguments=arguments,
                                            args_hash=digest, principal=who.principal, annotations=tool.annotations)
            t1 = time.perf_counter()
            facts = extract_facts(tool.name, arguments, tool.classifiers, tool.annotations, gate.classify_context)
            redaction = Redaction.of(arguments, facts, rescan=False)
            t2 = time.perf_counter()
            decision = gate.policy.current.decide(call, facts, redaction=redaction)
            t3 = time.perf_counter()
            await open_call(gate.ledger, call, redaction.arguments, decision, state="allowed", holder=gate.broker.instance_id)
            t4 = time.perf_counter()
            result = await tool.run(arguments)
            t5 = time.perf_counter()
            await gate.ledger.finish(call.call_id, "executed",
                                     {"result_digest": result_digest(result), "is_error": False})
            t6 = time.perf_counter()
            if keep:
                for name, a, b in (("validate + hash arguments", t, t1), ("classify + redact", t1, t2),
                                   ("policy decision", t2, t3), ("ledger: record before run (1 commit)", t3, t4),
                                   ("run the tool", t4, t5), ("ledger: record the outcome (1 commit)", t5, t6)):
                    steps.setdefault(name, []).append(b - a)
            if i % 64 == 0:
                await anyio.lowlevel.checkpoint()  # let the server's background tasks run, as they would between requests
    out = {name: {"median_us": statistics.median(v) * 1e6, "p99_us": sorted(v)[int(len(v) * 0.99) - 1] * 1e6}
           for name, v in steps.items()}
    guarded = out["guarded call (Gate.call)"]["median_us"]
    bare = out["the tool alone (no guard)"]["median_us"]
    return {"calls": calls, "steps": out, "guard_us_median": guarded - bare}
