"""A test tool pack whose tools record every run, so a test can tell exactly what ran, and when.

    tools: [{module: tests.reliability.probe_tools, options: {runs: /tmp/x/runs.log, gates: /tmp/x/gates}}]

Every run appends one JSON line to `runs` (O_APPEND, then fsync) *before* it returns, so the record
survives a `kill -9` of the keyturn process that ran it:

- `probe_run(tag, note)`   records {"tool", "tag", "phase": "ran"} and returns {"tag": tag}.
- `probe_block(tag)`       records "started", waits until the file `gates/<tag>` exists (at most 120 s), then
                           records "finished": a tool that is still running when a test kills the server.
- `probe_fail(tag, note)`  records "ran" then raises an error whose message quotes `note` (a tool whose
                           error text carries its arguments, as real drivers' errors do).

The reliability policy decides on the tag's prefix: allow-, deny-, hold-, expire-, dba- (see policy.yaml).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from server.guarded import ToolRegistry, guarded_tool
from tools._common import PackOptions, parse_options

PACK = "tests.reliability.probe_tools"
BLOCK_LIMIT_S = 120.0


class ProbeOptions(PackOptions):
    runs: str
    gates: str = ""


def record(path: Path, entry: dict[str, Any]) -> None:
    line = (json.dumps({**entry, "pid": os.getpid(), "ts": time.time()}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_runs(path: Path) -> list[dict[str, Any]]:
    """The run records (a test's view of what the tools did)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def register(registry: ToolRegistry, options: Mapping[str, Any]) -> None:
    opts = parse_options(ProbeOptions, options, PACK)
    runs = Path(opts.runs)
    gates = Path(opts.gates) if opts.gates else runs.parent / "gates"

    @guarded_tool(annotations={"readOnlyHint": False, "destructiveHint": True, "openWorldHint": False})
    async def probe_run(tag: str, note: str = "") -> dict[str, Any]:
        """Record that this call ran (the test's witness) and return its tag."""
        record(runs, {"tool": "probe_run", "tag": tag, "phase": "ran"})
        return {"tag": tag}

    @guarded_tool(annotations={"readOnlyHint": False, "destructiveHint": True, "openWorldHint": False})
    async def probe_block(tag: str) -> dict[str, Any]:
        """Record the start, wait for the test to open this tag's gate, record the end."""
        record(runs, {"tool": "probe_block", "tag": tag, "phase": "started"})
        gate = gates / tag
        with anyio.fail_after(BLOCK_LIMIT_S):
            while not gate.exists():  # another process (the test) creates it
                await anyio.sleep(0.02)
        record(runs, {"tool": "probe_block", "tag": tag, "phase": "finished"})
        return {"tag": tag}

    @guarded_tool(annotations={"readOnlyHint": False, "destructiveHint": True, "openWorldHint": False})
    async def probe_fail(tag: str, note: str = "") -> dict[str, Any]:
        """Record the run, then fail with an error that quotes `note`."""
        record(runs, {"tool": "probe_fail", "tag": tag, "phase": "ran"})
        raise RuntimeError(f"probe failed while handling {note!r}")

    for tool in (probe_run, probe_block, probe_fail):
        registry.add(tool)
