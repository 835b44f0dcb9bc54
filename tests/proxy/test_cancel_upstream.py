"""An agent cancels a call that is running upstream, through a real `keyturn proxy` (over stdio and over HTTP):
the upstream receives its own `notifications/cancelled`, no more progress reaches the agent, the ledger ends the call
once, saying the caller cancelled it while it ran, and the same connection serves the next call."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import mcp_types as types
import pytest
from mcp import Client

from server.gate import CANCELLED_WHILE_RUNNING
from tests.conftest import ReviewerAPI, agent_client
from tests.helpers import eventually
from tests.proxy.conftest import HERE, ProxyHome, text

TICKING = HERE / "ticking_server.py"
Connect = Callable[[ProxyHome, Callable[[Any], Any]], AbstractAsyncContextManager[Client]]


def ticking(home: ProxyHome) -> dict[str, Any]:
    return {"name": "ticking", "command": sys.executable, "args": [str(TICKING), str(home.dir / "ticks.log")],
            "mounts": [{"path": str(home.dir), "writable": True}]}


def ticks(home: ProxyHome) -> list[dict[str, Any]]:
    path = home.dir / "ticks.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@asynccontextmanager
async def over_stdio(home: ProxyHome, on_message: Callable[[Any], Any]) -> AsyncIterator[Client]:
    async with Client(home.proxy_params(), message_handler=on_message) as client:
        yield client


@asynccontextmanager
async def over_http(home: ProxyHome, on_message: Callable[[Any], Any]) -> AsyncIterator[Client]:
    async with agent_client(home.proxy_http(), message_handler=on_message) as client:
        yield client


async def ignore(progress: float, total: float | None, message: str | None) -> None:
    """A progress callback: the SDK's client asks the server for progress only when it has one."""


class Progress:
    """Every progress notification the agent's connection receives, by token (the SDK's client tees them to its
    message handler, also for a request it no longer waits for)."""

    def __init__(self) -> None:
        self.seen: list[types.ProgressNotificationParams] = []

    async def on_message(self, message: Any) -> None:
        if isinstance(message, types.ProgressNotification):
            self.seen.append(message.params)

    def tokens(self) -> set[Any]:
        return {p.progress_token for p in self.seen}


async def cancel_once_ticking(client: Client, progress: Progress, tool: str, before: Callable[[], Any]) -> None:
    """Call `tool` in a task (`before()` first, inside it), and cancel that task once its progress arrives."""
    async def call() -> None:
        await client.call_tool(tool, {}, progress_callback=ignore)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await before()
        await eventually(lambda: len(progress.seen) >= 3, within=30)
        tg.cancel_scope.cancel()  # the SDK's client sends keyturn `notifications/cancelled`


async def assert_cancelled_upstream_once(home: ProxyHome, client: Client, progress: Progress,
                                         call_id: str) -> None:
    [started] = [t for t in ticks(home) if t.get("tool") in ("tick", "tick_write")]
    # The upstream's handler was cancelled: it received keyturn's notifications/cancelled for its request.
    await eventually(lambda: any(t.get("cancelled") == started["id"] for t in ticks(home)), within=20)
    await eventually(lambda: home.terminal(call_id) == "failed", within=20)
    heard = len(progress.seen)
    # The next call on the same connection runs (and reports its own progress, under a token of its own).
    after = await client.call_tool("tick", {"steps": 3}, progress_callback=ignore)
    assert text(after) == "ticked 3 times"
    assert len({p.progress_token for p in progress.seen[:heard]}) == 1
    late = [p for p in progress.seen[heard:] if p.progress_token == progress.seen[0].progress_token]
    assert late == []  # nothing more for the cancelled request, while the upstream would have ticked on
    events = home.ledger_events(call_id)
    terminal = [e for e in events if e["kind"] in ("executed", "failed", "denied", "expired", "cancelled",
                                                   "abandoned")]
    assert [e["kind"] for e in terminal] == ["failed"]
    assert terminal[0]["payload"]["error"] == CANCELLED_WHILE_RUNNING
    assert terminal[0]["payload"]["cancelled_by"] == "caller"
    assert "may or may not have acted" in CANCELLED_WHILE_RUNNING
    assert len({t["pid"] for t in ticks(home)}) == 1  # the same upstream process throughout


@pytest.mark.parametrize("connect", [over_stdio, over_http], ids=["stdio", "http"])
async def test_cancelling_an_allowed_call_cancels_it_upstream(home: ProxyHome, connect: Connect) -> None:
    home.configure([ticking(home)])
    progress = Progress()
    with anyio.fail_after(90):
        async with connect(home, progress.on_message) as client:
            await cancel_once_ticking(client, progress, "tick", anyio.lowlevel.checkpoint)
            [call] = [e for e in home.ledger_events() if e["kind"] == "call.received"]
            await assert_cancelled_upstream_once(home, client, progress, call["call_id"])


@pytest.mark.parametrize("connect", [over_stdio, over_http], ids=["stdio", "http"])
async def test_cancelling_an_approved_call_while_it_runs_cancels_it_upstream(
        home: ProxyHome, connect: Connect) -> None:
    home.configure([ticking(home)])
    api = ReviewerAPI(home.serve_http())
    progress = Progress()
    held: dict[str, Any] = {}

    async def approve() -> None:
        held.update(await api.wait_pending("tick_write"))
        assert (await api.vote(held["id"], "approve", "alice", "fine")).status_code == 200
        await eventually(lambda: any(t.get("tool") == "tick_write" for t in ticks(home)), within=20)
        progress.seen.clear()  # the wait's own progress: from here on, the upstream's

    with anyio.fail_after(90):
        async with connect(home, progress.on_message) as client:
            await cancel_once_ticking(client, progress, "tick_write", approve)
            await assert_cancelled_upstream_once(home, client, progress, held["id"])
    kinds = [e["kind"] for e in home.ledger_events(held["id"])]
    assert kinds.count("execution.started") == 1
