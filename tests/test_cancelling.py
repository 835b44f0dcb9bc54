"""A caller cancels a call while its tool runs: an interruptible tool (an upstream's) is stopped and the call is
recorded as cancelled while it ran; a native tool, which may be mid-write, runs to its end and is recorded as it
ended. Either way progress stops at the cancel, and the call ends in exactly one terminal event."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest

from server.approvals import ApprovalBroker, ReviewerDirectory
from server.classify import ClassifyContext
from server.gate import CANCELLED_NOT_STOPPED, CANCELLED_WHILE_RUNNING, Gate, Identity, tool_progress
from server.ledger import Ledger
from server.models import Event
from server.policy import LivePolicy

POLICY = """
version: 1
default: review
review: {timeout: 10m, approvers: [{any: true, quorum: 1}]}
rules:
  - {id: reads, tool: "read_*", outcome: allow, risk: low, reason: reads run}
"""
TERMINAL = {"executed", "failed", "denied", "expired", "cancelled", "abandoned"}


class Working:
    """A gate `Runnable` that reports progress once, waits for `go_on`, reports again and ends (or is stopped)."""

    def __init__(self, name: str, *, interruptible: bool) -> None:
        self.name = name
        self.interruptible = interruptible
        self.annotations: dict[str, Any] = {}
        self.classifiers: dict[str, str] = {}
        self.started = anyio.Event()
        self.go_on = anyio.Event()
        self.ended = ""

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        return arguments

    async def run(self, arguments: dict[str, Any]) -> types.CallToolResult:
        progress = tool_progress.get()
        assert progress is not None
        try:
            await progress(1, None, "step 1")
            self.started.set()
            await self.go_on.wait()
            await progress(2, None, "step 2")
        except anyio.get_cancelled_exc_class():
            self.ended = "stopped"
            raise
        self.ended = "finished"
        return types.CallToolResult(content=[types.TextContent(type="text", text="done")])


@pytest.fixture
async def gate(tmp_path: Path) -> AsyncIterator[Gate]:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    policy = LivePolicy(policy_file)
    policy.load()
    async with Ledger(tmp_path / "ledger.db") as ledger:
        broker = ApprovalBroker(ledger=ledger, directory=ReviewerDirectory(identities={}, groups_of={}),
                                poll_interval_s=0.05)
        yield Gate(ledger=ledger, broker=broker, policy=policy, classify_context=ClassifyContext())


async def cancel_while_running(gate: Gate, tool: Working) -> list[str | None]:
    """Call `tool`, cancel the call once it has started, then let the tool go on; the progress messages heard."""
    heard: list[str | None] = []

    async def report(progress: float, total: float | None, message: str | None) -> None:
        heard.append(message)

    caller = anyio.CancelScope()

    async def call() -> None:
        with caller:
            await gate.call(tool, {}, Identity(principal="agent"), report)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await tool.started.wait()
            caller.cancel()  # as the SDK does for the request's handler on notifications/cancelled
            await anyio.wait_all_tasks_blocked()
            tool.go_on.set()
    return heard


async def terminal(gate: Gate) -> list[Event]:
    return [e for e in await gate.ledger.tail(1000) if e.kind in TERMINAL]


async def test_an_interruptible_run_is_stopped_and_recorded_as_cancelled_while_it_ran(gate: Gate) -> None:
    tool = Working("read_upstream", interruptible=True)
    heard = await cancel_while_running(gate, tool)
    assert tool.ended == "stopped" and heard == ["step 1"]
    [end] = await terminal(gate)
    assert end.kind == "failed"
    assert end.payload == {"error": CANCELLED_WHILE_RUNNING, "cancelled_by": "caller"}
    assert "may or may not have acted" in CANCELLED_WHILE_RUNNING


async def test_a_native_run_is_not_interrupted_but_its_progress_stops_and_the_ledger_says_so(gate: Gate) -> None:
    tool = Working("read_native", interruptible=False)
    heard = await cancel_while_running(gate, tool)
    assert tool.ended == "finished" and heard == ["step 1"]  # it ran to its end; "step 2" went to nobody
    [end] = await terminal(gate)
    assert end.kind == "executed" and not end.payload["is_error"]
    assert end.payload["note"] == CANCELLED_NOT_STOPPED


async def test_a_native_run_without_progress_is_not_watched_and_is_recorded_as_it_ended(gate: Gate) -> None:
    """Nothing to stop (no progress, a native run): no watch; the cancel reaches the caller after the outcome."""
    tool = Quiet("read_quiet")
    caller = anyio.CancelScope()

    async def call() -> None:
        with caller:
            await gate.call(tool, {}, Identity(principal="agent"), None)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await tool.started.wait()
            caller.cancel()
            await anyio.wait_all_tasks_blocked()
            tool.go_on.set()
    assert tool.ended == "finished"
    [end] = await terminal(gate)
    assert end.kind == "executed" and "note" not in end.payload


class Quiet(Working):
    """A native `Runnable` that reports no progress."""

    def __init__(self, name: str) -> None:
        super().__init__(name, interruptible=False)

    async def run(self, arguments: dict[str, Any]) -> types.CallToolResult:
        assert tool_progress.get() is None
        self.started.set()
        await self.go_on.wait()
        self.ended = "finished"
        return types.CallToolResult(content=[types.TextContent(type="text", text="done")])
