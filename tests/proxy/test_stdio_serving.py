"""`keyturn proxy` over stdio serves the upstream's tools: a client, in a 2025-era session or a 2026-era one, gets
the upstream's results, progress and tool-list changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.stdio import stdio_client

from tests.helpers import eventually
from tests.proxy.conftest import ProxyHome, text


def appending(log: Path) -> TextIO:
    return open(log, "a", encoding="utf-8")  # (a real file: the child process writes to it)


@pytest.mark.parametrize("mode", ["legacy", "auto"])  # `auto`: the SDK client's default, a 2026-era session
async def test_upstream_calls_give_their_results_progress_and_tool_changes(home: ProxyHome, mode: str) -> None:
    home.configure([home.flaky()])
    params = home.proxy_params("--log-level", "DEBUG")
    progress: list[tuple[float, float | None, str | None]] = []
    changed = anyio.Event()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    with anyio.fail_after(60), appending(home.dir / "proxy.log") as errlog:
        async with Client(stdio_client(params, errlog=errlog), mode=mode, message_handler=on_message) as client:
            calls = [await client.call_tool("echo", {"text": "hi"}),
                     await client.call_tool("slow", {"steps": 3}, progress_callback=on_progress),
                     await client.call_tool("fail", {}),
                     await client.call_tool("run_query", {"query": "SELECT 1"}),
                     await client.call_tool("add_tool", {})]
            if mode == "legacy":
                await changed.wait()
            else:  # a 2026-era session hears of list changes only by subscribing: it looks instead
                async def listed() -> bool:
                    return "extra" in {t.name for t in (await client.list_tools()).tools}

                await eventually(listed)
            calls.append(await client.call_tool("extra", {}))  # a tool the upstream added while serving
    results = [(r.is_error, text(r), r.structured_content) for r in calls]
    assert [(is_error, said) for is_error, said, _ in results] == [
        (False, "hi"), (False, "done in 3 steps"), (True, "upstream says no: the flux capacitor is offline"),
        (False, "ran: SELECT 1"), (False, "added"), (False, "extra ran")]
    assert [(value, message) for value, _, message in progress] == [(1, "step 1"), (2, "step 2"), (3, "step 3")]
    # The upstream is asked for progress only for a call whose client asked for it.
    assert {c["tool"] for c in home.calls() if (c["meta"] or {}).get("progressToken") is not None} == {"slow"}
    assert len([c for c in home.calls() if c["tool"] == "slow"]) == 1
