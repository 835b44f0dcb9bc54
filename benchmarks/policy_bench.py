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
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.classify import ClassifyContext, extract_facts  # noqa: E402
from server.policy import parse_policy  # noqa: E402
from server.policy.testing import KNOWN_TOOL_CLASSIFIERS, call_for  # noqa: E402

CONDITIONS = [
    'facts.sql.kinds.exists(k, k == "delete") && facts.sql.tables.exists(t, t.startsWith("t{i}"))',
    "facts.env.prod && !facts.sql.read_only",
    'principal == "agent-{i}" && size(facts.sql.tables) > 3',
    'has(args.limit) && args.limit > {i}',
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


def measure(fn: object, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t = time.perf_counter_ns()
        fn()  # type: ignore[operator]
        out.append((time.perf_counter_ns() - t) / 1000)
    return out


def report(name: str, samples: list[float]) -> None:
    samples = sorted(samples)
    p99 = samples[int(len(samples) * 0.99) - 1]
    print(f"  {name:<22} median {statistics.median(samples):8.1f} µs   p99 {p99:8.1f} µs   max {samples[-1]:8.1f} µs")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=5000)
    opts = parser.parse_args()
    t = time.perf_counter()
    policy = parse_policy(generated_policy(opts.rules), source="bench")
    print(f"policy: {len(policy.rules)} rules, compiled in {(time.perf_counter() - t) * 1000:.0f} ms")
    ctx = ClassifyContext(
        keyturn_paths=(Path("/var/lib/keyturn/keyturn.db"),), keyturn_urls=("http://127.0.0.1:8765",), roots=(Path("/srv"),)
    )
    scenarios = [
        ("sql_query", {"query": "SELECT o.id, c.name FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = 7"}),
        ("shell_run", {"command": "git status && ls -la /srv/agent | head -20"}),
        ("http_request", {"method": "GET", "url": "https://api.github.com/repos/python/cpython"}),
        ("tool_17", {"limit": 50, "query": "anything"}),
        ("team_10_deploy", {"target": "production", "token": "not-a-secret"}),
    ]
    for tool, args in scenarios:
        call = call_for(tool, args)
        kinds = KNOWN_TOOL_CLASSIFIERS.get(tool, {})
        facts = extract_facts(tool, args, kinds, call.annotations, ctx)
        policy.decide(call, facts)  # warm the per-tool rule cache, as a running server would be
        print(f"{tool}: {len(policy.candidates(tool))} candidate rules -> {policy.decide(call, facts).outcome}")
        fresh = _fresh(args)  # a different SQL text every time: no help from the parse cache
        report("extract_facts", measure(lambda: extract_facts(tool, next(fresh), kinds, call.annotations, ctx), opts.calls))
        report("decide", measure(lambda: policy.decide(call, facts), opts.calls))
        report(
            "extract_facts+decide",
            measure(lambda: policy.decide(call, extract_facts(tool, next(fresh), kinds, call.annotations, ctx)), opts.calls),
        )


def _fresh(args: dict[str, object]) -> Iterator[dict[str, object]]:
    n = 0
    while True:
        n += 1
        yield {k: f"{v} AND {n} = {n}" if k == "query" and str(v).startswith("SELECT") else v for k, v in args.items()}


if __name__ == "__main__":
    main()
