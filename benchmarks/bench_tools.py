"""The benchmark's keyturn tool pack: one trivial tool, `echo`, the same one `plain_server.py` serves unguarded.

Served by keyturn with `tools: [{module: benchmarks.bench_tools}]` (repository root on PYTHONPATH).
"""

from __future__ import annotations

from server.registry import guarded_tool


@guarded_tool(annotations={"readOnlyHint": True})
async def echo(text: str) -> str:
    """Return `text` unchanged."""
    return text
