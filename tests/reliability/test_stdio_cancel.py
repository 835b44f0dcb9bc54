"""A client's cancel reaches the held call however the client spells it in JSON, and only a notification cancels.

Stories through a real `keyturn serve` over stdio, written line by line: a held call that the client cancels with
`"notifications\\/cancelled"` (valid JSON escaping of the same method) is not run when a reviewer approves it later;
a *request* named `notifications/cancelled` cancels nothing. A reviewer decides through another keyturn process's
API, as in the desktop case. The probe pack's run log witnesses whether the tool ran; the ledger tells each story.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.conftest import ReviewerAPI
from tests.helpers import eventually
from tests.reliability.conftest import RelHome

ESCAPED_CANCEL = b'{"jsonrpc":"2.0","method":"notifications\\/cancelled","params":{"requestId":7,"reason":"bored"}}'


class Wire:
    """A client that writes JSON-RPC lines to a server's stdin and reads its stdout line by line."""

    def __init__(self, proc: Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.stdout = BufferedByteReceiveStream(proc.stdout)
        self.seen: list[dict[str, Any]] = []  # everything the server wrote

    async def send(self, message: dict[str, Any] | bytes) -> None:
        line = message if isinstance(message, bytes) else json.dumps(message).encode()
        assert self.proc.stdin is not None
        await self.proc.stdin.send(line + b"\n")

    async def answer(self, rid: Any, timeout: float = 30) -> dict[str, Any]:
        """The response to request `rid` (notifications and other answers before it are kept in `seen`)."""
        with anyio.fail_after(timeout):
            while True:
                message = json.loads(await self.stdout.receive_until(b"\n", 2**24))
                self.seen.append(message)
                if "method" not in message and message.get("id") == rid:
                    return dict(message)

    async def initialize(self) -> None:
        await self.send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "wire-agent", "version": "1"}}})
        assert "result" in await self.answer(0)
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def leave(self) -> None:
        """Close stdin and read what the server writes until it exits."""
        assert self.proc.stdin is not None
        await self.proc.stdin.aclose()
        with anyio.fail_after(30):
            try:
                while True:
                    self.seen.append(json.loads(await self.stdout.receive_until(b"\n", 2**24)))
            except (anyio.EndOfStream, anyio.IncompleteRead):
                pass


@asynccontextmanager
async def stdio_wire(command: list[str], log: Path, cwd: Path, env: dict[str, str]) -> AsyncIterator[Wire]:
    """A keyturn process (serve or proxy) over stdio, spoken to byte by byte; its stderr goes to `log`."""
    with open(log, "ab") as errlog:  # noqa: ASYNC230 (the child's stderr)
        async with await anyio.open_process(command, stderr=errlog, cwd=cwd, env=env) as proc:
            wire = Wire(proc)
            try:
                yield wire
            finally:
                if proc.returncode is None:
                    assert proc.stdin is not None
                    await proc.stdin.aclose()
                    with anyio.fail_after(30):
                        await proc.wait()


@asynccontextmanager
async def stdio_keyturn(home: RelHome) -> AsyncIterator[Wire]:
    async with stdio_wire([sys.executable, "-m", "server.cli", "serve", "--config", str(home.config)],
                          home.dir / "serve-stdio.log", home.dir, home.env()) as wire:
        yield wire


def held_call(rid: Any, tag: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
            "params": {"name": "probe_run", "arguments": {"tag": tag}, "_meta": {"progressToken": f"p{rid}"}}}


def kinds(home: RelHome, request_id: str) -> list[str]:
    return [e["kind"] for e in home.ledger_events(request_id)]


def ran(home: RelHome, tag: str) -> int:
    return sum(1 for r in home.runs() if r["tag"] == tag and r["phase"] == "ran")


async def test_a_cancel_spelled_with_an_escaped_slash_withdraws_the_held_call_and_the_approval_runs_nothing(
        rhome: RelHome) -> None:
    assert json.loads(ESCAPED_CANCEL)["method"] == "notifications/cancelled"  # the same JSON, spelled otherwise
    api = ReviewerAPI(rhome.serve_http())
    async with stdio_keyturn(rhome) as wire:
        await wire.initialize()
        await wire.send(held_call(7, "hold-escaped"))
        request = await api.wait_pending("probe_run")
        await wire.send(ESCAPED_CANCEL)
        await eventually(lambda: "client.left" in kinds(rhome, request["id"]))  # the held call stopped waiting

        assert (await api.vote(request["id"], "approve", "alice", "fine")).status_code == 200
        await eventually(lambda: rhome.calls()[request["id"]] == "approved")
        # The process that held the call learns of an approval within a poll (0.1 s): time enough to run it, were it
        # still waiting.
        with anyio.move_on_after(3):
            while "execution.started" not in kinds(rhome, request["id"]) and not ran(rhome, "hold-escaped"):
                await anyio.sleep(0.05)
        # The process that held the call serves on, and never answers the call its client cancelled.
        await wire.send({"jsonrpc": "2.0", "id": 8, "method": "ping"})
        assert "result" in await wire.answer(8)
        assert ran(rhome, "hold-escaped") == 0
        assert "execution.started" not in kinds(rhome, request["id"])

        # The agent withdraws it for good: the call ends cancelled, never run.
        await wire.send({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
            "name": "keyturn_cancel", "arguments": {"request_id": request["id"], "reason": "not wanted"}}})
        assert (await wire.answer(9))["result"]["isError"] is False
        await wire.leave()
    assert not [m for m in wire.seen if m.get("id") == 7 and "method" not in m], wire.seen
    assert ran(rhome, "hold-escaped") == 0
    assert rhome.assert_one_outcome_each() == {request["id"]: "cancelled"}
    rhome.verify()


async def test_a_request_named_notifications_cancelled_cancels_nothing(rhome: RelHome) -> None:
    api = ReviewerAPI(rhome.serve_http())
    async with stdio_keyturn(rhome) as wire:
        await wire.initialize()
        await wire.send(held_call(7, "hold-request"))
        request = await api.wait_pending("probe_run")
        # A request (it has an id) is not the cancel notification: it gets an error, and the held call keeps waiting.
        await wire.send({"jsonrpc": "2.0", "id": 99, "method": "notifications/cancelled",
                         "params": {"requestId": 7, "reason": "a request is not a cancel"}})
        refused = await wire.answer(99)
        assert refused["error"]["code"] == -32601, refused  # method not found
        await wire.send({"jsonrpc": "2.0", "id": 100, "method": "ping"})
        await wire.answer(100)
        assert "client.left" not in kinds(rhome, request["id"])
        assert rhome.calls()[request["id"]] == "pending"

        assert (await api.vote(request["id"], "approve", "alice", "fine")).status_code == 200
        result = await wire.answer(7)  # the call that was never cancelled runs, once, and is answered
        assert result["result"]["isError"] is False and json.loads(result["result"]["content"][0]["text"])["tag"] == \
            "hold-request"
    assert ran(rhome, "hold-request") == 1
    assert rhome.assert_one_outcome_each() == {request["id"]: "executed"}
    rhome.verify()


def test_the_escaped_cancel_is_valid_json_for_any_parser() -> None:
    parsed = subprocess.run([sys.executable, "-c", "import json,sys; print(json.load(sys.stdin)['method'])"],
                            input=ESCAPED_CANCEL, capture_output=True, check=True)
    assert parsed.stdout.strip() == b"notifications/cancelled"
