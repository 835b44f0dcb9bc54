"""The benchmark's keyturn tool pack: `echo`, the same trivial tool `plain_server.py` serves unguarded, and
`held_echo`, the same again under a policy rule that holds it for review (the held-calls benchmark).

Served by keyturn with `tools: [{module: benchmarks.bench_tools}]` (repository root on PYTHONPATH).
"""

from __future__ import annotations

import time

from server.guarded import guarded_tool

STARTS: dict[str, list[float]] = {}
"""held_echo's runs in this process: text -> the `time.perf_counter()` of each start (in-process benchmarks)."""


@guarded_tool(annotations={"readOnlyHint": True})
async def echo(text: str) -> str:
    """Return `text` unchanged."""
    return text


@guarded_tool(annotations={"readOnlyHint": True})
async def held_echo(text: str) -> str:
    """Return `text` unchanged, once a reviewer approved it (and note when it started)."""
    STARTS.setdefault(text, []).append(time.perf_counter())
    return text
