"""How long does deciding one call take with a 1,000-rule policy? (A harness, not a timed test.)

    .venv/bin/python benchmarks/policy_bench.py [--rules 1000] [--calls 5000]

The policy: the shipped default rules plus N generated ones spread over 200 tool names, a tenth
of them globbed ("team_*"), with CEL conditions like real ones. Prints median and p99 for
extract_facts, decide, and both together, for a few representative calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.classify import ClassifyContext, extract_facts
from server.policy import CompiledPolicy, parse_policy
from server.policy.testing import KNOWN_TOOL_CLASSIFIERS, call_for

CONDITIONS = [
    'facts.sql.kinds.exists(k, k == "delete") && facts.sql.tables.exists(t, t.startsWith("t{i}"))',
    "facts.env.prod && !facts.sql.read_only",
    'principal == "agent-{i}" && size(facts.sql.tables) > 3',
    "has(args.limit) && args.limit > {i}",
    'facts.shell.programs.exists(p, p == "tool{i}")',
    'facts.paths.all.exists(p, p.startsWith("/data/{i}/"))',
    'glob(tool, "team_{i}*") && facts.secrets.present',
]


def generated_policy(n: int) -> str:
    default = (Path(__file__).resolve().parent.parent / "policies" / "default.yaml").read_text()
    lines = [default.rstrip(), ""]
    for i in range(n):
        if i % 10 == 0:
            tool = f'"team_{i % 50}_*"'
        elif i % 97 == 0:
            tool = '"sql_*"'
        else:
            tool = f"tool_{i % 200}"
        cond = CONDITIONS[i % len(CONDITIONS)].format(i=i)
        outcome = ("allow", "review", "deny")[i % 3]
        lines += [
            f"  - id: gen-{i}",
            f"    tool: {tool}",
            f"    when: '{cond}'",
            f"    outcome: {outcome}",
            f"    risk: {('low', 'medium', 'high', 'critical')[i % 4]}",
            f'    reason: "generated rule {i} on {{facts.sql.tables}}"',
        ]
    return "\n".join(lines) + "\n"


def measure(fn: Callable[[], object], calls: int, cpu: list[float] | None = None) -> list[float]:
    """Wall-clock µs per call; this thread's CPU µs per call go to `cpu` (they ignore other processes' noise)."""
    wall = []
    for _ in range(calls):
        t, c = time.perf_counter_ns(), time.thread_time_ns()
        fn()
        if cpu is not None:
            cpu.append((time.thread_time_ns() - c) / 1000)
        wall.append((time.perf_counter_ns() - t) / 1000)
    return wall


def report(name: str, wall: list[float], cpu: list[float]) -> None:
    for label, values in (("wall", wall), ("cpu", cpu)):
        values = sorted(values)
        p99 = values[int(len(values) * 0.99) - 1]
        print(
            f"  {name:<22} {label:<4} median {statistics.median(values):8.1f} µs   p99 {p99:8.1f} µs"
            f"   max {values[-1]:9.1f} µs"
        )


SCENARIOS = [
    ("sql_query", {"query": "SELECT o.id, c.name FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = 7"}),
    ("shell_run", {"command": "git status && ls -la /srv/agent | head -20"}),
    ("http_request", {"method": "GET", "url": "https://api.github.com/repos/python/cpython"}),
    ("tool_17", {"limit": 50, "query": "anything"}),
    ("team_10_deploy", {"target": "production", "token": "not-a-secret"}),
]


def run(rules: int = 1000, calls: int = 5000, *, verbose: bool = False) -> dict[str, Any]:
    """Decide every scenario `calls` times under a policy of `rules` generated rules; samples in µs per scenario."""
    t = time.perf_counter()
    policy = parse_policy(generated_policy(rules), source="bench")
    compile_ms = (time.perf_counter() - t) * 1000
    if verbose:
        print(f"policy: {len(policy.rules)} rules, compiled in {compile_ms:.0f} ms")
    ctx = ClassifyContext(
        keyturn_paths=(Path("/var/lib/keyturn/keyturn.db"),), keyturn_urls=("http://127.0.0.1:8765",), roots=(Path("/srv"),)
    )
    out: dict[str, Any] = {"rules": len(policy.rules), "compile_ms": compile_ms, "scenarios": {}}
    for tool, args in SCENARIOS:
        out["scenarios"][tool] = scenario(policy, ctx, tool, args, calls, verbose=verbose)
    return out


def scenario(
    policy: CompiledPolicy, ctx: ClassifyContext, tool: str, args: dict[str, Any], calls: int, *, verbose: bool
) -> dict[str, Any]:
    """Samples (µs, wall clock) for one call shape; CPU-time samples under "cpu"."""
    call = call_for(tool, args)
    kinds = KNOWN_TOOL_CLASSIFIERS.get(tool, {})
    facts = extract_facts(tool, args, kinds, call.annotations, ctx)
    policy.decide(call, facts)  # warm the per-tool rule cache, as a running server would be
    fresh = _fresh(args)  # a different SQL text each time: the parse cache does not help
    cpu: dict[str, list[float]] = {"extract_facts": [], "decide": [], "extract_facts+decide": []}
    result: dict[str, Any] = {
        "candidates": len(policy.candidates(tool)),
        "outcome": policy.decide(call, facts).outcome,
        "extract_facts": measure(
            lambda: extract_facts(tool, next(fresh), kinds, call.annotations, ctx), calls, cpu["extract_facts"]
        ),
        "decide": measure(lambda: policy.decide(call, facts), calls, cpu["decide"]),
        "extract_facts+decide": measure(
            lambda: policy.decide(call, extract_facts(tool, next(fresh), kinds, call.annotations, ctx)),
            calls,
            cpu["extract_facts+decide"],
        ),
        "cpu": cpu,
    }
    if verbose:
        print(f"{tool}: {result['candidates']} candidate rules -> {result['outcome']}")
        for name in ("extract_facts", "decide", "extract_facts+decide"):
            report(name, result[name], cpu[name])
    return result


def _fresh(args: dict[str, Any]) -> Iterator[dict[str, Any]]:
    n = 0
    while True:
        n += 1
        yield {k: f"{v} AND {n} = {n}" if k == "query" and str(v).startswith("SELECT") else v for k, v in args.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=5000)
    opts = parser.parse_args()
    run(opts.rules, opts.calls, verbose=True)


if __name__ == "__main__":
    main()
